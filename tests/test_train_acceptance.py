"""Teacher-forced draft acceptance (training metric) against drafting through the KV cache."""
import pytest
import torch

from blockdiff.model.sampler_head import SamplerHead
from support.models import tiny_model
from blockdiff.model.kv_cache import KVCache
from blockdiff.train.acceptance import draft_acceptance, summarize
from blockdiff.train.objective import ObjectiveConfig, ObjectiveModule

L, VOCAB = 4, 40
MASK = VOCAB - 1


def inference_draft(model, prefix: torch.Tensor, tok: int) -> torch.Tensor:
    """What linear_spec drafts after `prefix`: a bidirectional pass over [tok, MASK x (L-1)]
    on top of the prefix's cache, adapter on. -> (L-1,) argmax drafts."""
    cache = KVCache(model.config, 1, len(prefix) + L, torch.float32, torch.device("cpu"))
    if len(prefix):
        model(prefix[None], None, cache, "causal")
        cache.advance(len(prefix))
    block = torch.tensor([[tok] + [MASK] * (L - 1)])  # (1, L)
    positions = torch.arange(len(prefix), len(prefix) + L)[None]  # (1, L)
    hidden = model(block, positions, cache, "bidirectional", adapter_gate=torch.ones(1, L, dtype=torch.bool))
    logits = model.logits(hidden[0, 1:])
    if model.sampler_head is None:
        return logits.argmax(-1)
    return model.sampler_head.greedy_drafts(hidden[:, 1:], logits[None], torch.tensor([tok]),
                                            model.embed_tokens, model.head_weight)[0]


@pytest.mark.parametrize("with_head", [False, True])
def test_acceptance_counts_what_linear_spec_would_accept(with_head):
    torch.manual_seed(0)
    model = tiny_model(vocab=VOCAB)
    for name, m in model.lora_modules().items():
        if name.endswith("o_proj"):
            m.attach_lora(4, 8.0, B=torch.randn(m.out_features, 4))  # drafts differ from the base model's
    if with_head:  # drafts walk the block through the head, as the spec modes draft
        model.sampler_head = SamplerHead(model.config.hidden_size, 16, top_k=3)
        torch.nn.init.normal_(model.sampler_head.up.weight, std=2.0)
    # Build each block from the drafts the model itself makes there, keeping a known number
    # of them (then one wrong token), so the true accepted length of every block is known.
    gen = torch.Generator().manual_seed(1)
    seq, expected = [], []
    for keep in [3, 0, 2, 1, 3, 0]:
        tok = int(torch.randint(0, MASK, (), generator=gen))
        drafts = inference_draft(model, torch.tensor(seq, dtype=torch.long), tok).tolist()
        wrong = (drafts[keep] + 1) % MASK if keep < L - 1 else None
        rest = torch.randint(0, MASK, (L - 2 - keep,), generator=gen).tolist() if keep < L - 1 else []
        seq += [tok] + drafts[:keep] + ([wrong] if wrong is not None else []) + rest
        expected.append(keep)
    x0 = torch.tensor([seq])  # (1, 6 * L)
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    loss_mask[0, :L] = False  # a prompt block: not scored
    objective = ObjectiveModule(model, ObjectiveConfig(block_size=L), draft_only=True)
    totals = draft_acceptance(objective, x0, loss_mask, MASK)
    scored = expected[1:]
    assert totals.tolist() == [len(scored)] + [sum(k >= j for k in scored) for j in range(1, L)]
    metrics = summarize(totals)
    assert abs(metrics["val_accept_len"] - sum(scored) / len(scored)) < 1e-12
    assert metrics["val_accept_rate"] == [round(sum(k >= j for k in scored) / len(scored), 4) for j in range(1, L)]


def test_doubled_forward_gives_the_same_acceptance():
    """Full-weight targets run the doubled [x_t | x_0] pass instead of the cached prefix."""
    torch.manual_seed(0)
    model = tiny_model(vocab=VOCAB)
    x0 = torch.randint(0, MASK, (3, 14))  # a ragged last block is left out
    loss_mask = torch.rand(3, 14) > 0.2
    cfg = ObjectiveConfig(block_size=L)
    fast = draft_acceptance(ObjectiveModule(model, cfg, draft_only=True), x0, loss_mask, MASK)
    doubled = draft_acceptance(ObjectiveModule(model, cfg), x0, loss_mask, MASK)
    assert torch.equal(fast, doubled)
    assert fast[0] == int(loss_mask[:, 1:12:L].sum())  # blocks whose first draft slot is scored


def test_slots_after_a_stop_token_are_not_scored():
    """With data.pad_to_block an answer ends in EOS padding; decoding stops at the first EOS,
    so drafts after it must not count as accepted."""
    torch.manual_seed(0)
    model = tiny_model(vocab=VOCAB)
    STOP = 0
    first = inference_draft(model, torch.tensor([], dtype=torch.long), 5).tolist()
    seq = [5] + first  # block 0: every draft is what the model drafts (3 accepted)
    second = inference_draft(model, torch.tensor(seq), 7).tolist()
    seq += [7, second[0], second[1], STOP]  # block 1: the answer ends with EOS in its last slot
    seq += [STOP] * L  # block 2: EOS padding up to the next block boundary
    x0 = torch.tensor([seq])  # (1, 3 * L)
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    objective = ObjectiveModule(model, ObjectiveConfig(block_size=L), draft_only=True)
    totals = draft_acceptance(objective, x0, loss_mask, MASK, stop_id=STOP)
    eos_drafted = int(second[2] == STOP)  # block 1's last slot is scored: its target is the EOS
    assert totals.tolist() == [2, 2, 2, 1 + eos_drafted]
    assert draft_acceptance(objective, x0, loss_mask, MASK)[0] == 3  # without stop_id the padding block counts
