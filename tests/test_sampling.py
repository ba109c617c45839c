"""SamplingParams validation and the samplers' statistics."""
import pytest
import torch

from blockdiff.decoding.sampler import pick
from blockdiff.decoding.verify import accept
from blockdiff.sampling import InvalidParameter, SamplingParams, probabilities


@pytest.mark.parametrize("kwargs,param", [
    (dict(mode="fast"), "mode"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"), (dict(block_length=0), "block_length"),
    (dict(block_length=4096), "block_length"), (dict(threshold=1.5), "threshold"),
    (dict(threshold=-0.1), "threshold"), (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_new_tokens=2.5), "max_new_tokens"),
])
def test_bad_parameters_name_themselves(kwargs, param):
    with pytest.raises(InvalidParameter, match=param) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_unknown_mode_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="ar, diffusion, linear_spec, quad_spec"):
        SamplingParams(mode="turbo")


def test_unknown_keyword_is_a_value_error():
    with pytest.raises(ValueError, match="unknown sampling parameter.*tempurature"):
        SamplingParams.from_kwargs(tempurature=0.5)


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (probabilities(logits, SamplingParams(temperature=1.0, top_k=2))[0, 2:] == 0).all()
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert p[0, 0] > 0 and p[0, 1] > 0 and (p[0, 2:] == 0).all()  # 0.64 < 0.7, so two are needed
    p = probabilities(logits, SamplingParams(temperature=1.0, min_p=0.3))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_gumbel_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).expand(1, 20000, 3)
    g = torch.Generator().manual_seed(0)
    tokens = pick(logits, [SamplingParams(temperature=1.0)], [g]).tokens[0]
    freq = torch.bincount(tokens, minlength=3).double() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.015, rtol=0)


@pytest.mark.slow
def test_rejection_rule_keeps_the_target_distribution():
    """Drafts from a wrong q, verified against p: emitted tokens must follow p."""
    V, N = 4, 20000
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=1.0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=torch.float64)
    target_logits = torch.log(torch.stack([p, p]))  # (K+1, V) with K = 1 draft
    counts = torch.zeros(V)
    accepted_total = 0
    for _ in range(N):
        draft = torch.multinomial(q, 1, generator=g)
        (accepted,), (bonus,) = accept(draft[None], q[None, None], target_logits[None], [params], [g])
        first = int(draft[0]) if accepted else bonus
        counts[first] += 1
        accepted_total += accepted
    torch.testing.assert_close(counts.double() / N, p, atol=0.015, rtol=0)
    # acceptance rate is sum(min(p, q)) = 0.1 + 0.2 + 0.1 + 0.1
    assert abs(accepted_total / N - 0.5) < 0.02


def test_greedy_acceptance_is_the_longest_agreeing_prefix():
    target = torch.nn.functional.one_hot(torch.tensor([5, 6, 9, 8]), 10).float()  # AR says 5 6 9 8
    drafts = torch.tensor([[5, 6, 7], [5, 6, 9], [1, 6, 9]])
    assert accept(drafts, None, target.expand(3, 4, 10), [SamplingParams()] * 3, [None] * 3) == ([2, 3, 0], [9, 8, 5])


MIXED = [SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_k=5),
         SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05), SamplingParams(temperature=0.8)]


def _generators(seed: int) -> list:
    return [None if p.greedy else torch.Generator().manual_seed(seed + row) for row, p in enumerate(MIXED)]


def test_a_rows_picks_do_not_depend_on_its_batch():
    """Rows with their own parameters and generators, picked together and one at a time."""
    logits = torch.randn(len(MIXED), 6, 50, generator=torch.Generator().manual_seed(3)) * 3
    drawn = torch.rand(len(MIXED), 6, generator=torch.Generator().manual_seed(4)) < 0.6
    together = pick(logits, MIXED, _generators(10), drawn)
    for row, (params, generator) in enumerate(zip(MIXED, _generators(10))):
        alone = pick(logits[row:row + 1], [params], [generator], drawn[row:row + 1])
        assert torch.equal(alone.tokens[0][drawn[row]], together.tokens[row][drawn[row]])
        assert torch.equal(alone.confidence[0], together.confidence[row])
        assert torch.equal(alone.probs[0], together.probs[row])
    greedy = pick(logits[:1], MIXED[:1], [None])
    assert torch.equal(greedy.tokens[0], logits[0].argmax(-1))


def test_a_rows_verdict_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(5)
    B, K, V = len(MIXED), 4, 30
    target = torch.randn(B, K + 1, V, generator=g) * 2
    drafts = target[:, :K].argmax(-1)
    drafts[:, 2] = torch.randint(0, V, (B,), generator=g)  # some drafts disagree with the target
    draft_probs = torch.softmax(torch.randn(B, K, V, generator=g, dtype=torch.float64), -1)
    verdict = accept(drafts, draft_probs, target, MIXED, _generators(20))
    for row, (params, generator) in enumerate(zip(MIXED, _generators(20))):
        alone = accept(drafts[row:row + 1], draft_probs[row:row + 1], target[row:row + 1], [params], [generator])
        assert alone == ([verdict[0][row]], [verdict[1][row]])
    assert verdict[0][0] == 2  # the greedy row: the longest prefix the argmax agrees with


def test_a_step_without_drafts_samples_the_token_after_them():
    """Block length 1 verifies no drafts: the sampled row's token comes from p itself."""
    target = torch.log(torch.tensor([[[0.0, 1.0, 0.0]]]))  # (1, K+1 = 1, V)
    accepted, bonus = accept(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, 3, dtype=torch.float64), target,
                             [SamplingParams(temperature=1.0)], [torch.Generator().manual_seed(0)])
    assert (accepted, bonus) == ([0], [1])
