"""The sampler head: drafts conditioned on the pick before them, lossless spec modes, its file."""
import json

import pytest
import torch

from blockdiff.decoding.batch import DecodeBatch
from blockdiff.decoding.sequence import Sequence
from blockdiff.errors import CheckpointError
from blockdiff.model.adapter import load_adapter, save_adapter
from blockdiff.model.sampler_head import SamplerHead
from blockdiff.sampling import SamplingParams, probabilities
from blockdiff.train.objective import ObjectiveConfig, ObjectiveModule, add_noise
from support.models import attach_random_draft_adapter, decode, run, tiny_model


def random_head(model, seed: int = 0, top_k: int = 4) -> SamplerHead:
    torch.manual_seed(seed)
    head = SamplerHead(model.config.hidden_size, 48, top_k)
    with torch.no_grad():
        head.up.weight.normal_(std=2.0)  # a trained head is not the identity
    return head


def test_an_untrained_head_drafts_what_the_pass_drafts():
    model = tiny_model(1, vocab=24)
    head = SamplerHead(model.config.hidden_size, 16, top_k=3)
    hidden = torch.randn(2, 5, model.config.hidden_size)
    logits = model.logits(hidden)
    drafts = head.greedy_drafts(hidden, logits, torch.tensor([1, 2]), model.embed_tokens, model.head_weight)
    assert torch.equal(drafts, logits.argmax(-1))


def test_greedy_drafts_match_a_slot_by_slot_recompute():
    """Slot s picks, among the pass's top-k for s, the best under head(h_s, embed(pick at s-1))."""
    model = tiny_model(2, vocab=24)
    head = random_head(model)
    hidden = torch.randn(3, 6, model.config.hidden_size)
    logits = model.logits(hidden)
    first = torch.tensor([4, 5, 6])
    drafts = head.greedy_drafts(hidden, logits, first, model.embed_tokens, model.head_weight)
    for b in range(3):
        previous = int(first[b])
        for s in range(6):
            with torch.no_grad():
                scores = model.logits(head(hidden[b, s], model.embed_tokens.weight[previous]))  # (V,)
            candidates = logits[b, s].topk(4).indices
            previous = int(candidates[scores[candidates].argmax()])
            assert int(drafts[b, s]) == previous, (b, s)
    assert not torch.equal(drafts, logits.argmax(-1))  # the head does change drafts here


def test_spec_modes_stay_lossless_with_a_head_and_it_round_trips(tmp_path):
    base = tiny_model(6, vocab=24)
    adapted = attach_random_draft_adapter(tiny_model(6, vocab=24))
    adapted.sampler_head = random_head(adapted)
    save_adapter(adapted, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["blockdiff_sampler_head"] == {"inner_size": 48, "top_k": 4}
    loaded = tiny_model(6, vocab=24)
    load_adapter(loaded, tmp_path / "adapter")
    for name, tensor in adapted.sampler_head.state_dict().items():
        assert torch.equal(loaded.sampler_head.state_dict()[name], tensor), name
    prompts = [[1, 2, 3], [7, 8]]
    ar = [s.output_ids for s in run(base, prompts, mode="ar", max_new_tokens=20)]
    for mode in ["linear_spec", "quad_spec"]:
        with_head = run(loaded, prompts, mode=mode, max_new_tokens=20, block_length=5)
        assert [s.output_ids for s in with_head] == ar, mode
    assert drafted(loaded) != drafted(adapted_without_head(loaded))  # the head did draft differently


def drafted(model) -> list[list[int]]:
    events = []
    seqs = [Sequence([1, 2, 3], SamplingParams(mode="linear_spec", max_new_tokens=20, block_length=5))]
    decode(model, seqs, on_event=lambda kind, p: kind == "draft" and events.append(p["drafts"]))
    return events


def adapted_without_head(model):
    model.sampler_head = None
    return model


def test_sampled_rows_draft_from_the_pass_and_greedy_rows_through_the_head():
    model = tiny_model(3, vocab=24)
    model.sampler_head = random_head(model, seed=1)
    seqs = [Sequence([1, 2], SamplingParams(temperature=0.0, max_new_tokens=4, block_length=4)),
            Sequence([1, 2], SamplingParams(temperature=1.0, seed=3, max_new_tokens=4, block_length=4))]
    batch = DecodeBatch(model, seqs, extra_slots=4)
    for seq in seqs:
        seq.pending = 5
    hidden = torch.randn(2, 3, model.config.hidden_size)
    drafts, probs = batch.draft_tokens(hidden)
    logits = model.logits(hidden)
    head_drafts = model.sampler_head.greedy_drafts(hidden[:1], logits[:1], torch.tensor([5]),
                                                   model.embed_tokens, model.head_weight)
    assert torch.equal(drafts[0], head_drafts[0])
    assert torch.equal(probs[1], probabilities(logits[1:], seqs[1].params)[0])  # the sampled row's own distribution


def test_training_reaches_the_head_and_its_loss_adds_to_the_pass():
    """With `up` at zero the head rescores nothing, so its loss equals the pass's: twice the sum."""
    model = tiny_model(4, vocab=40)
    cfg = ObjectiveConfig(block_size=4, kl_weight=0.5)
    x0 = torch.randint(0, 39, (2, 8))
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    batch = add_noise(x0, loss_mask, 39, cfg, seeds=[1, 2])
    without = ObjectiveModule(model, cfg)(batch.xt, x0, loss_mask, batch.masked, batch.p)
    model.sampler_head = SamplerHead(model.config.hidden_size, 16, 4)
    with_head = ObjectiveModule(model, cfg)(batch.xt, x0, loss_mask, batch.masked, batch.p)
    assert torch.allclose(with_head[1], 2 * without[1])
    with_head[1].backward()
    assert model.sampler_head.up.weight.grad.abs().sum() > 0


def test_a_damaged_head_file_is_a_clear_error(tmp_path):
    adapted = attach_random_draft_adapter(tiny_model(6, vocab=24))
    adapted.sampler_head = random_head(adapted)
    save_adapter(adapted, tmp_path)
    (tmp_path / "sampler_head.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="sampler_head.safetensors: not a sampler head"):
        load_adapter(tiny_model(6, vocab=24), tmp_path)
