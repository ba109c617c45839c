"""Captured decode steps (model/step_graphs.py) over static caches (model/kv_cache.py).

No GPU has been lent to this project, so the capture itself is unverified; everything around
it is checked here: a static forward equals the dynamic one bit for bit in every attention
pattern, decoding through StepGraphs' buffers (capture=False) gives every mode's tokens, and a
static forward neither reads the host nor copies from it, which a capture would refuse.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blockdiff.decoding.quad_spec import fused_offsets, fused_pattern
from blockdiff.engine.llm import LLM
from blockdiff.model.kv_cache import KVCache
from blockdiff.model.sampler_head import SamplerHead
from blockdiff.model.step_graphs import StepGraphs
from support.models import attach_random_draft_adapter, run, tiny_model

MODES = ["ar", "diffusion", "linear_spec", "quad_spec"]


def drafting_model(dtype=torch.float32):
    model = attach_random_draft_adapter(tiny_model(3, vocab=40))
    model.sampler_head = SamplerHead(model.config.hidden_size, 48, 4)
    model = model.to(dtype)
    model.prepare_for_inference()
    return model


def forwards(model, cache: KVCache, generator: torch.Generator):
    """Every kind of decode-step forward over a cache of 3 ragged rows, as (name, hidden)."""
    B, vocab, L = 3, model.config.vocab_size, 4
    prompt = torch.randint(0, vocab, (B, 9), generator=generator)
    yield "prefill", model(prompt, None, cache, "causal")
    cache.advance([9, 6, 8])
    yield "ar", model(prompt[:, :1], None, cache, "causal")
    yield "draft", model(prompt[:, :L], None, cache, "bidirectional", torch.ones(B, L, dtype=torch.bool))
    yield "verify", model(prompt[:, :L + 1], None, cache, "causal")
    cache.advance([2, 5, 1])
    positions = cache.lengths[:, None] + fused_offsets(L)  # (B, L + L*L)
    gate = torch.zeros(B, L + L * L, dtype=torch.bool)
    gate[:, L:] = True
    tokens = torch.randint(0, vocab, (B, L + L * L), generator=generator)
    yield "quad_spec", model(tokens, positions, cache, fused_pattern(L), gate)
    cache.crop([10, 7, 9])
    yield "no adapter row", model(prompt[:, :2], None, cache, "causal", torch.zeros(B, 2, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_a_static_forward_equals_the_dynamic_one_in_every_pattern(dtype):
    """Attending over the whole capacity (static) instead of the aligned span (dynamic), with
    slots planned on the device, changes no bit of any row."""
    model = drafting_model(dtype)
    runs = {}
    for static in (False, True):
        cache = KVCache(model.config, 3, 200, model.dtype, static=static)
        runs[static] = list(forwards(model, cache, torch.Generator().manual_seed(0)))
        if static:
            assert cache.span == cache.capacity and cache.device_lengths.tolist() == cache.lengths.tolist()
    for (name, dynamic), (_, static) in zip(runs[False], runs[True]):
        assert torch.equal(dynamic, static), name


@pytest.mark.parametrize("max_running", [1, 3])
def test_decoding_through_step_graphs_gives_every_modes_tokens(max_running):
    """Each mode, greedy and seeded sampled, sequences retiring and joining (the cache's
    tensors replaced under the steps): the same tokens as the eager engine."""
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10], [4, 4, 2]]
    for mode in MODES:
        for temperature in (0.0, 0.8):
            model = drafting_model()
            params = dict(mode=mode, max_new_tokens=9, block_length=4, temperature=temperature, seed=5)
            eager = [s.output_ids for s in run(model, prompts, eos=6, **params)]
            model.step_graphs = StepGraphs(model, capture=False)
            captured = [s.output_ids for s in run(model, prompts, eos=6, **params)]
            assert captured == eager, (mode, temperature)
            graphs = model.step_graphs
            assert graphs.replayed > graphs.recorded > 0, "the steps ran from recorded shapes"


@torch.inference_mode()
def test_a_shape_keeps_its_buffers_until_the_cache_tensors_change():
    model = drafting_model()
    graphs = StepGraphs(model, capture=False)
    cache = KVCache(model.config, 2, 64, static=True)
    cache.advance([3, 5])
    tokens = torch.tensor([[1], [2]])
    graphs(tokens, None, cache, "causal")
    step = graphs._steps[cache][1][shape_of(tokens)]
    other = torch.tensor([[4], [7]])
    assert torch.equal(graphs(other, None, cache, "causal"), model(other, None, cache, "causal"))
    assert graphs._steps[cache][1][shape_of(tokens)] is step and step.inputs.tokens.tolist() == [[4], [7]]
    cache.keep_rows([1])
    graphs(torch.tensor([[3]]), None, cache, "causal")
    assert list(graphs._steps[cache][1]) == [shape_of(torch.tensor([[3]]))]  # the old shape's buffers went
    with pytest.raises(RuntimeError, match="overflow"):
        graphs(torch.zeros(1, 100, dtype=torch.long)[:, :70], None, cache, "causal")
    with pytest.raises(ValueError, match="static"):
        graphs(tokens, None, KVCache(model.config, 2, 64), "causal")


def shape_of(tokens):
    return (tuple(tokens.shape), "causal", False, False)


class HostTraffic(TorchDispatchMode):
    """Records every op that moves data between the host and the device: one that takes or
    makes tensors on both. Ops on host tensors alone (the cache's bookkeeping) run once, at
    capture, and are allowed; a device tensor read on the host fails on the meta device."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.seen = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.seen.append(str(func))
        return out


@torch.inference_mode()
def test_a_static_forward_neither_reads_nor_copies_from_the_host():
    """The meta device stands in for CUDA (tests/test_device_placement.py): a host read fails
    on it outright, and HostTraffic names every op that takes a CPU tensor, which a capture
    would refuse. The first forward of a shape may make its one-time device copies (RoPE's
    frequencies), as StepGraphs' warm-up does before capturing."""
    device = torch.device("meta")
    model = drafting_model().to(device)
    model.prepare_for_inference()
    B, L = 2, 3
    cache = KVCache(model.config, B, 64, model.dtype, device, static=True)
    cache.advance([5, 3])
    positions = (cache.lengths[:, None] + fused_offsets(L)).to(device)  # (B, L + L*L)
    gate = torch.zeros(B, L + L * L, dtype=torch.bool, device=device)
    steps = [(torch.zeros(B, 1, dtype=torch.long, device=device), None, "causal", None),
             (torch.zeros(B, L, dtype=torch.long, device=device), None, "bidirectional",
              torch.ones(B, L, dtype=torch.bool, device=device)),
             (torch.zeros(B, L + L * L, dtype=torch.long, device=device), positions, fused_pattern(L).to(device), gate)]
    for tokens, pos, pattern, step_gate in steps:
        model(tokens, pos, cache, pattern, step_gate)  # the warm-up
        with HostTraffic(device) as traffic:
            hidden = model(tokens, pos, cache, pattern, step_gate)
        assert traffic.seen == [] and hidden.device == device, (pattern, traffic.seen)
    dynamic = KVCache(model.config, B, 64, model.dtype, device)
    dynamic.advance([5, 3])
    with HostTraffic(device) as traffic:  # the check can fail: a dynamic cache plans on the host
        model(steps[0][0], None, dynamic, "causal")
    assert traffic.seen


def test_cuda_graphs_needs_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graphs"):
        LLM("tiny", cuda_graphs=True)
