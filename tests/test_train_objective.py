"""The SPEC section 4 objective: the mask, the noise, and that the AR half is the base model."""
import math

import torch
import torch.nn.functional as F

from support.models import tiny_model
from blockdiff.train.objective import (ObjectiveConfig, ObjectiveModule, add_noise, block_diff_mask,
                                       combine, counts, mask_probabilities)


def brute_force_mask(n: int, block: int) -> torch.Tensor:
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            q_noisy, k_noisy = q < n, k < n
            qp, kp = q % n, k % n
            if q_noisy and k_noisy:
                m[q, k] = qp // block == kp // block
            elif q_noisy:
                m[q, k] = kp // block < qp // block
            elif not k_noisy:
                m[q, k] = kp <= qp
    return m


def test_mask_matches_brute_force():
    for n, block in [(8, 4), (8, 3), (5, 8), (12, 1), (16, 16)]:
        assert torch.equal(block_diff_mask(n, block), brute_force_mask(n, block)), (n, block)


def test_noise_level_and_loss_mask():
    cfg = ObjectiveConfig(block_size=4)
    x0 = torch.arange(64).repeat(200, 1)  # (200, 64)
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    loss_mask[:, :10] = False
    batch = add_noise(x0, loss_mask, 999, cfg, seeds=list(range(200)))
    assert not batch.masked[:, :10].any()
    assert torch.equal(batch.xt[batch.masked], torch.full_like(batch.xt[batch.masked], 999))
    assert torch.equal(batch.xt[~batch.masked], x0[~batch.masked])
    # per sequence the masked fraction tracks its p
    frac = batch.masked[:, 10:].float().mean(1)
    assert (frac - batch.p[:, 0]).abs().mean() < 0.06
    assert batch.p.min() >= cfg.eps
    # same seed, same noise, whatever the batch it sits in
    again = add_noise(x0[5:6], loss_mask[5:6], 999, cfg, seeds=[5])
    assert torch.equal(again.xt[0], batch.xt[5])


def test_draft_shaped_noise_masks_all_but_each_blocks_first_token():
    x0 = torch.arange(10).repeat(64, 1)  # (64, 10): blocks of 4 with a ragged last one
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    loss_mask[:, 5] = False
    plain = add_noise(x0, loss_mask, 99, ObjectiveConfig(block_size=4), seeds=list(range(64)))
    mixed = add_noise(x0, loss_mask, 99, ObjectiveConfig(block_size=4, draft_fraction=0.5), seeds=list(range(64)))
    draft_shape = torch.tensor([False, True, True, True, False, False, True, True, False, True])
    shaped = (mixed.masked == draft_shape).all(1)
    assert 16 < int(shaped.sum()) < 48  # about half the sequences
    assert (mixed.p[shaped] == 1.0).all()
    # the others keep exactly the noise they had without the option
    assert torch.equal(mixed.masked[~shaped], plain.masked[~shaped])
    assert torch.equal(mixed.p[~shaped], plain.p[~shaped])
    every = add_noise(x0, loss_mask, 99, ObjectiveConfig(block_size=4, draft_fraction=1.0), seeds=[3])
    assert torch.equal(every.masked[0], draft_shape)


def test_position_dependent_masking_rises_within_block_and_keeps_mean():
    cfg = ObjectiveConfig(block_size=8, position_dependent=True)
    t = torch.tensor([0.3, 0.5, 0.9])
    p = mask_probabilities(t, 16, cfg)  # (3, 16)
    # w_i = exp(beta (1 - t) i) with exp(-beta L) = 0.1
    assert (p[:, 1:8] >= p[:, :7]).all() and (p[0, 7] / p[0, 0] - 10 ** (0.7 * 7 / 8)).abs() < 1e-3
    expected = (1 - cfg.eps) * t + cfg.eps
    assert torch.allclose(p[:2].view(2, 2, 8).mean(-1), expected[:2, None].expand(2, 2), atol=1e-6)
    assert torch.allclose(p[:, :8], p[:, 8:])  # every block alike


def test_clean_stream_equals_plain_causal_forward():
    torch.manual_seed(0)
    model = tiny_model(vocab=40).double()
    x0 = torch.randint(0, 39, (2, 12))
    cfg = ObjectiveConfig(block_size=4)
    batch = add_noise(x0, torch.ones_like(x0, dtype=torch.bool), 39, cfg, seeds=[1, 2])
    positions = torch.arange(12).repeat(2).expand(2, 24)
    doubled = model(torch.cat([batch.xt, x0], 1), positions=positions, pattern=block_diff_mask(12, 4))
    plain = model(x0, pattern="causal")
    assert torch.allclose(doubled[:, 12:], plain, atol=1e-10)
    # changing the noisy half does not move the clean half (no leak)
    other = model(torch.cat([torch.randint(0, 39, (2, 12)), x0], 1), positions=positions,
                  pattern=block_diff_mask(12, 4))
    assert torch.allclose(other[:, 12:], plain, atol=1e-10)


def test_loss_values_match_a_direct_computation():
    torch.manual_seed(0)
    model = tiny_model(vocab=40).double()
    cfg = ObjectiveConfig(block_size=4)
    x0 = torch.randint(0, 39, (2, 8))
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    batch = add_noise(x0, loss_mask, 39, cfg, seeds=[3, 4])
    sums = ObjectiveModule(model, cfg)(batch.xt, x0, loss_mask, batch.masked, batch.p)
    plain = model.logits(model(x0))
    ar = F.cross_entropy(plain[:, :-1].reshape(-1, 40), x0[:, 1:].reshape(-1), reduction="sum")
    assert torch.allclose(sums[0], ar)
    positions = torch.arange(8).repeat(2).expand(2, 16)
    noisy = model.logits(model(torch.cat([batch.xt, x0], 1), positions=positions,
                               pattern=block_diff_mask(8, 4)))[:, :8]
    ce = F.cross_entropy(noisy.reshape(-1, 40), x0.reshape(-1), reduction="none").view(2, 8)
    diff = (ce / batch.p * batch.masked).sum()
    assert torch.allclose(sums[1], diff)
    norms = counts(loss_mask)
    assert norms.tolist() == [14, 16]
    assert math.isclose(float(combine(sums, norms, cfg).detach()), float((ar / 14 + 0.3 * diff / 16).detach()), rel_tol=1e-9)


def test_lora_leaves_ar_loss_at_the_base_model():
    torch.manual_seed(0)
    model = tiny_model(vocab=40)
    cfg = ObjectiveConfig(block_size=4)
    x0 = torch.randint(0, 39, (2, 8))
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    batch = add_noise(x0, loss_mask, 39, cfg, seeds=[7, 8])
    objective = ObjectiveModule(model, cfg)
    base = objective(batch.xt, x0, loss_mask, batch.masked, batch.p)
    for name, m in model.lora_modules().items():
        if name.endswith("o_proj"):
            m.attach_lora(4, 8.0, B=torch.randn(m.out_features, 4))  # a non-zero adapter
    adapted = objective(batch.xt, x0, loss_mask, batch.masked, batch.p)
    assert torch.equal(adapted[0], base[0])  # AR path exactly the base model
    assert not torch.allclose(adapted[1], base[1])  # the adapter does act on the noisy half
    adapted[1].backward()
    assert all(m.lora_A.grad is not None for n, m in model.lora_modules().items() if n.endswith("o_proj"))


def test_draft_only_pass_gives_the_joint_losses_and_gradients():
    """The LoRA shortcut (clean half once, without autograd, as a cache) is the same objective."""
    torch.manual_seed(0)
    model = tiny_model(vocab=40).double()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in model.lora_modules().items():
        if name.endswith(("o_proj", "q_proj")):
            m.attach_lora(4, 8.0, B=torch.randn(m.out_features, 4, dtype=torch.float64))
    cfg = ObjectiveConfig(block_size=4, position_dependent=True)
    x0 = torch.randint(0, 39, (3, 10))  # 10 is not a multiple of the block: a ragged last block
    loss_mask = torch.rand(3, 10) > 0.2
    batch = add_noise(x0, loss_mask, 39, cfg, seeds=[1, 2, 3])
    results = []
    for draft_only in (False, True):
        model.zero_grad(set_to_none=True)
        sums = ObjectiveModule(model, cfg, draft_only=draft_only)(batch.xt, x0, loss_mask, batch.masked, batch.p)
        combine(sums, counts(loss_mask), cfg).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sums.detach(), grads))
    (joint, joint_grads), (fast, fast_grads) = results
    assert torch.allclose(joint, fast, rtol=1e-10)
    assert joint_grads.keys() == fast_grads.keys() and len(fast_grads) == 2 * 2 * 2  # A and B, 2 layers, 2 targets
    for name in joint_grads:
        assert torch.allclose(joint_grads[name], fast_grads[name], rtol=1e-8, atol=1e-12), name


def test_ar_kind_is_plain_next_token_loss():
    torch.manual_seed(0)
    model = tiny_model(vocab=40)
    x0 = torch.randint(0, 39, (2, 8))
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    cfg = ObjectiveConfig(kind="ar")
    sums = ObjectiveModule(model, cfg)(x0, x0, loss_mask, torch.zeros_like(loss_mask), torch.ones(2, 8))
    assert float(sums[1]) == 0.0
    assert float(combine(sums, counts(loss_mask), cfg)) == float(sums[0] / 14)


def test_anchor_offsets_shift_the_text_under_the_draft_grid():
    x0 = torch.arange(100, 116).repeat(32, 1)  # (32, 16): four blocks of 4
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    cfg = ObjectiveConfig(block_size=4, draft_fraction=1.0, anchor_offsets=True)
    batch = add_noise(x0, loss_mask, 99, cfg, seeds=list(range(32)))
    offsets = batch.x0[:, 0] - 100  # each sequence starts at its offset's token
    assert set(offsets.tolist()) == {0, 1, 2, 3}
    for b, o in enumerate(offsets.tolist()):
        assert torch.equal(batch.x0[b], x0[b].roll(-o))
        assert batch.loss_mask[b].tolist() == [True] * (16 - o) + [False] * o  # the wrapped tail is no target
        assert (batch.xt[b, 16 - o:] == 99).all()  # and is masked, as slots past the text are
        assert batch.masked[b].tolist() == [i % 4 != 0 and i < 16 - o for i in range(16)]
    assert torch.equal(add_noise(x0, loss_mask, 99, ObjectiveConfig(block_size=4, draft_fraction=1.0),
                                 seeds=list(range(32))).x0, x0)  # without the option nothing moves


def test_kl_and_slot_decay_match_a_full_recompute():
    """diff_sum = sum over masked j of decay**(slot-1) / p_j * (CE_j + w * KL(AR_j || draft_j)),
    with AR_j the plain causal model's prediction for position j, in both passes."""
    torch.manual_seed(0)
    model = tiny_model(vocab=40).double()
    cfg = ObjectiveConfig(block_size=4, kl_weight=0.7, slot_decay=0.5, draft_fraction=0.5)
    x0 = torch.randint(0, 39, (4, 8))
    loss_mask = torch.ones_like(x0, dtype=torch.bool)
    batch = add_noise(x0, loss_mask, 39, cfg, seeds=[1, 2, 3, 4])
    batch.masked[:, 0] = True  # position 0 has no AR prediction: CE only
    positions = torch.arange(8).repeat(2).expand(4, 16)
    noisy = model.logits(model(torch.cat([batch.xt, x0], 1), positions=positions,
                               pattern=block_diff_mask(8, 4)))[:, :8]  # (4, 8, 40)
    ar = F.log_softmax(model.logits(model(x0)), -1)  # (4, 8, 40): ar[:, j-1] predicts position j
    ce = F.cross_entropy(noisy.reshape(-1, 40), x0.reshape(-1), reduction="none").view(4, 8)
    draft = F.log_softmax(noisy, -1)
    kl = torch.zeros(4, 8, dtype=torch.float64)
    kl[:, 1:] = (ar[:, :-1].exp() * (ar[:, :-1] - draft[:, 1:])).sum(-1)
    decay = torch.tensor([1.0, 1.0, 0.5, 0.25] * 2, dtype=torch.float64)
    expected = ((ce + 0.7 * kl) * decay / batch.p * batch.masked).sum()
    for draft_only in (False, True):
        sums = ObjectiveModule(model, cfg, draft_only=draft_only)(batch.xt, x0, loss_mask, batch.masked, batch.p)
        assert torch.allclose(sums[1], expected.float(), rtol=1e-5), draft_only  # logits are float32
