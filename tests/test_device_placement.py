"""The decode path's device work runs on a device that is not the CPU, beside host bookkeeping
(cache lengths, positions, token ids) that stays on the CPU. No GPU has been lent to this
project, so a device mix-up has to be found here, before the first lease.

PyTorch's meta device stands in for CUDA: its tensors hold no data, an op that meets a CPU
tensor fails as it would on CUDA ("Tensor on device cpu is not on the expected device meta"),
and a host read (.item(), .tolist(), .cpu()) fails outright, so every function run here is
also shown to make no host copy. FakeTensorMode's fake CUDA would not do: it fakes the CPU
bookkeeping too, and the cache's host-side length checks cannot read fakes.
"""
import pytest
import torch

from blockdiff.decoding.quad_spec import fused_offsets, fused_pattern
from blockdiff.decoding.sampler import pick_on_device
from blockdiff.decoding.verify import accept_on_device
from blockdiff.model.kv_cache import KVCache
from blockdiff.model.sampler_head import SamplerHead
from blockdiff.sampling import SamplingParams
from support.models import attach_random_draft_adapter, tiny_model

DEVICE = torch.device("meta")


@pytest.fixture(scope="module")
def model():
    model = attach_random_draft_adapter(tiny_model(0))
    model.sampler_head = SamplerHead(model.config.hidden_size, 48, 4)
    model = model.to(DEVICE)
    model.prepare_for_inference()
    return model


def on_device(*tensors: torch.Tensor) -> bool:
    return all(t.device == DEVICE for t in tensors)


@torch.inference_mode()
def test_forwards_in_every_pattern_and_the_cache_run_on_the_device(model):
    vocab, B = model.config.vocab_size, 3
    cache = KVCache(model.config, B, 96, model.dtype, DEVICE)
    prompt = torch.randint(0, vocab, (B, 7))
    assert on_device(model(prompt, None, cache, "causal"))  # prefill: every row at one length
    cache.advance([7, 5, 6])  # ragged rows: forwards below write through per-row slots
    assert on_device(model(prompt[:, :1], None, cache, "causal"))  # ar's one-token step
    draft = model(prompt[:, :4], None, cache, "bidirectional", torch.ones(B, 4, dtype=torch.bool))
    verify = model(prompt[:, :4], None, cache, "causal")
    assert on_device(draft, verify) and draft.shape == (B, 4, model.config.hidden_size)
    L = 3  # quad_spec's fused pass: anchors causal, sub-blocks of MASKs through the adapter
    gate = torch.zeros(B, L + L * L, dtype=torch.bool)
    gate[:, L:] = True
    positions = cache.lengths[:, None] + fused_offsets(L)  # (B, L + L*L)
    fused = model(torch.randint(0, vocab, (B, L + L * L)), positions, cache, fused_pattern(L), gate)
    assert on_device(fused, model.logits(fused[:, :L]))
    cache.advance([3, 1, 2])
    cache.crop([8, 6, 7])
    cache.keep_rows([0, 2])
    cache.merge(KVCache(model.config, 1, 160, model.dtype, DEVICE))
    assert on_device(cache.k, cache.v) and cache.lengths.tolist() == [8, 7, 0]
    assert on_device(model(prompt[:, :2], None, cache, "causal"))


@torch.inference_mode()
def test_sampling_drafting_and_acceptance_run_on_the_device(model):
    B, K, V = 3, 4, model.config.vocab_size
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.0, top_k=5)]
    generators = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    logits = torch.empty(B, K + 1, V, device=DEVICE)
    drawn = torch.ones(B, K + 1, dtype=torch.bool)
    drawn[1, 2:] = False
    assert on_device(*pick_on_device(logits, params, generators, drawn))
    drafts = torch.randint(0, V, (B, K))  # drafts live on the host, as the decoders keep them
    assert on_device(*accept_on_device(drafts, None, logits, [params[0]] * B, [None] * B))
    draft_probs = torch.empty(B, K, V, dtype=torch.float64, device=DEVICE)
    assert on_device(*accept_on_device(drafts, draft_probs, logits, params, generators))
    hidden = torch.empty(B, K, model.config.hidden_size, device=DEVICE)
    first = torch.randint(0, V, (B,))
    assert on_device(model.sampler_head.greedy_drafts(hidden, logits[:, :K], first, model.embed_tokens,
                                                      model.head_weight))


@torch.inference_mode()
def test_a_cpu_tensor_meeting_the_device_fails(model):
    """The stand-in catches what it is here for: a cache left on the CPU."""
    cache = KVCache(model.config, 1, 64, model.dtype, "cpu")
    with pytest.raises(RuntimeError, match="device|meta tensor"):
        model(torch.zeros(1, 4, dtype=torch.long), None, cache, "causal")
