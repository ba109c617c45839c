"""The four decoders on random tiny models: losslessness, batch invariance, lengths, EOS."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.models import decode, run, tiny_model
from blockdiff.decoding.sequence import Sequence
from blockdiff.sampling import SamplingParams

MODES = ["ar", "diffusion", "linear_spec", "quad_spec"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), prompt_len=st.integers(1, 12), block=st.integers(1, 9),
       max_new=st.integers(1, 40), eos=st.one_of(st.none(), st.integers(0, 11)), vocab=st.sampled_from([12, 24]))
def test_spec_modes_equal_ar_at_temperature_zero(seed, prompt_len, block, max_new, eos, vocab):
    model = tiny_model(seed, vocab=vocab)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab - 1, (prompt_len,), generator=g).tolist()
    ar = run(model, [prompt], eos, mode="ar", max_new_tokens=max_new)[0]
    for mode in ["linear_spec", "quad_spec"]:
        spec = run(model, [prompt], eos, mode=mode, max_new_tokens=max_new, block_length=block)[0]
        assert spec.output_ids == ar.output_ids, mode
        assert spec.finish_reason == ar.finish_reason
        assert spec.metrics.tpf >= 0.5 if mode == "linear_spec" else spec.metrics.tpf >= 1.0


def test_drafts_do_get_accepted_on_a_confident_model():
    """Guards the test above against passing only because every draft is rejected."""
    accepted = 0
    for seed in range(6):
        model = tiny_model(seed, vocab=12, sharpness=4.0)
        for mode in ["linear_spec", "quad_spec"]:
            seq = run(model, [[1, 2, 3]], mode=mode, max_new_tokens=40, block_length=6)[0]
            accepted += seq.metrics.accepted_tokens
            assert seq.metrics.accepted_by_position[0] >= seq.metrics.accepted_by_position[-1]
    assert accepted > 20


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batch_gives_the_same_tokens_as_one_at_a_time(mode, temperature):
    model = tiny_model(1, vocab=24)
    prompts = [[1, 2, 3, 4, 5], [7], [3] * 13, [9, 8]]
    kwargs = dict(mode=mode, max_new_tokens=21, block_length=5, temperature=temperature, seed=7)
    batched = run(model, prompts, eos=4, **kwargs)
    for prompt, seq in zip(prompts, batched):
        alone = run(model, [prompt], eos=4, **kwargs)[0]
        assert seq.output_ids == alone.output_ids
        assert seq.metrics.nfe == alone.metrics.nfe


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_new,block", [(1, 4), (5, 4), (13, 4), (32, 32), (33, 32), (7, 1)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_max_new_tokens_need_not_be_a_multiple_of_the_block(mode, max_new, block, temperature):
    model = tiny_model(2, vocab=24)
    seq = run(model, [[1, 2, 3]], mode=mode, max_new_tokens=max_new, block_length=block, temperature=temperature,
              seed=1)[0]
    assert len(seq.output_ids) == max_new
    assert seq.finish_reason == "length"


@pytest.mark.parametrize("mode", MODES)
def test_generation_ends_at_the_first_eos(mode):
    model = tiny_model(3, vocab=12)
    free = run(model, [[1, 2]], mode=mode, max_new_tokens=30, block_length=8)[0].output_ids
    eos = free[6]  # a token this mode emits: EOS is then reached at its first occurrence
    seq = run(model, [[1, 2]], eos=eos, mode=mode, max_new_tokens=30, block_length=8)[0]
    assert seq.finish_reason == "stop"
    assert seq.output_ids == free[:free.index(eos) + 1]


def test_diffusion_threshold_trades_steps_for_forwards():
    model = tiny_model(4, vocab=24)
    strict = run(model, [[1, 2, 3]], mode="diffusion", max_new_tokens=32, block_length=8, threshold=1.0)[0]
    loose = run(model, [[1, 2, 3]], mode="diffusion", max_new_tokens=32, block_length=8, threshold=0.0)[0]
    # threshold 1: one slot per pass (7 passes + 1 commit per block); threshold 0: one pass + commit
    assert strict.metrics.nfe == 4 * 8 - 1 and loose.metrics.nfe == 4 * 2 - 1
    assert loose.metrics.tpf > strict.metrics.tpf


@pytest.mark.parametrize("mode", MODES)
def test_sampling_is_reproducible_with_a_seed(mode):
    model = tiny_model(5, vocab=24)
    a = run(model, [[1, 2]], mode=mode, max_new_tokens=20, temperature=1.0, seed=3, block_length=4)[0]
    b = run(model, [[1, 2]], mode=mode, max_new_tokens=20, temperature=1.0, seed=3, block_length=4)[0]
    c = run(model, [[1, 2]], mode=mode, max_new_tokens=20, temperature=1.0, seed=4, block_length=4)[0]
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids


@pytest.mark.parametrize("mode", MODES)
def test_events_are_per_row_and_resolve_to_their_sequence(mode):
    """Rows retire mid-decode (different lengths, EOS); each event's row must name, at emit
    time, the sequence it is about: its commits are then exactly that sequence's output."""
    from blockdiff.decoding.batch import DecodeBatch
    from blockdiff.decoding.decoders import DECODERS
    from blockdiff.decoding.sequence import Sequence
    from blockdiff.sampling import SamplingParams

    model = tiny_model(6, vocab=24)
    prompts, lengths = [[1, 2, 3], [5], [7, 8, 9, 10, 11]], [9, 17, 4]
    seqs = [Sequence(p, SamplingParams(mode=mode, max_new_tokens=n, block_length=4), frozenset([6]))
            for p, n in zip(prompts, lengths)]
    events: dict[int, list] = {id(s): [] for s in seqs}
    decoder = DECODERS[mode]

    class Recorder:
        def wants(self, seq):
            return True

        def event(self, kind, seq, payload):
            assert seq is batch.seqs[payload["row"]]
            events[id(seq)].append((kind, payload))

    batch = DecodeBatch(model, seqs, decoder.extra_slots(seqs[0]), Recorder())
    with torch.inference_mode():
        decoder.start(batch)
        batch.retire()
        while len(batch):
            decoder.step(batch)
            batch.retire()
    silent = run(model, prompts[:1], eos=6, mode=mode, max_new_tokens=9, block_length=4)[0]
    assert seqs[0].output_ids == silent.output_ids  # observing changes nothing
    expected_kinds = {"ar": {"commit"}, "diffusion": {"denoise", "commit"}}.get(mode, {"draft", "verify", "commit"})
    for seq in seqs:
        got = events[id(seq)]
        assert {kind for kind, _ in got} <= expected_kinds
        assert [t for kind, p in got if kind == "commit" for t in p["tokens"]] == seq.output_ids
        assert all(p["nfe"] <= seq.metrics.nfe for _, p in got)


def test_diffusion_ends_a_block_at_a_stop_string_without_denoising_past_it():
    """The text is cut as before, and the slots after the stop string cost no passes."""
    model = tiny_model(5, vocab=26)
    letters = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # noqa: E731 one character per token
    params = dict(mode="diffusion", max_new_tokens=16, block_length=16, threshold=1.0)  # one slot per pass
    free = run(model, [[1, 2, 3]], **params)[0]
    stop = letters(free.output_ids[2:4])
    seq = Sequence([1, 2, 3], SamplingParams(stop=[stop], **params), detokenize=letters)
    decode(model, [seq])
    text = letters(free.output_ids)
    assert letters(seq.output_ids) == text[:text.index(stop)] and seq.finish_reason == "stop"
    # threshold 1 fills one slot per pass: the free run needed 15; this one stopped once the
    # slots up to the stop string were filled, and 15 passes means the text was only cut at the end
    assert seq.metrics.nfe < free.metrics.nfe == 15


def test_diffusion_runs_the_output_head_over_masked_slots_only(monkeypatch):
    """Each denoising pass decides the slots still masked; their logits, computed alone, pick
    what logits of the whole block pick (greedy and sampled rows), for fewer head rows."""
    from blockdiff.decoding import diffusion

    def full_logits(batch, hidden, drawn):
        return batch.model.logits(hidden)

    model = tiny_model(3, vocab=26)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    cases = [dict(mode="diffusion", max_new_tokens=13, block_length=6, threshold=0.6),
             dict(mode="diffusion", max_new_tokens=11, block_length=4, threshold=0.3, temperature=0.9, seed=7)]
    head_rows = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda hidden: head_rows.append(hidden.shape[:-1].numel()) or logits(hidden))
    for params in cases:
        head_rows.clear()
        masked_only = run(model, prompts, **params)
        masked_rows = sum(head_rows)
        with monkeypatch.context() as m:
            m.setattr(diffusion, "_logits_of", full_logits)
            head_rows.clear()
            whole = run(model, prompts, **params)
        assert [s.output_ids for s in masked_only] == [s.output_ids for s in whole]
        assert [s.metrics.nfe for s in masked_only] == [s.metrics.nfe for s in whole]
        assert masked_rows < sum(head_rows)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_long_prompts_prefilled_in_chunks_decode_the_same_tokens(monkeypatch, mode, temperature):
    """Prompts longer than PREFILL_CHUNK are cached a chunk at a time (the rest of quad_spec's
    fused pass included); each row's states, and so its tokens and prompt logprobs, are the
    ones a single pass gives, and no prefill pass is wider than a chunk."""
    from blockdiff.decoding import batch as batching

    model = tiny_model(4, vocab=24, sharpness=1.5)  # unsure enough that a wrong cache shows
    prompts = [list(range(1, 12)), [5] * 3, list(range(20, 0, -1)), [7, 8, 9, 10, 11, 12, 13, 14]]
    params = dict(mode=mode, max_new_tokens=9, block_length=3, temperature=temperature, seed=11, prompt_logprobs=2)
    if mode == "diffusion":
        params.pop("prompt_logprobs")  # scored from causal logits, which diffusion does not keep

    def decode_with(chunk):
        monkeypatch.setattr(batching, "PREFILL_CHUNK", chunk)
        widths = []
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda t, *a, **k: widths.append(t.shape[1]) or forward(t, *a, **k))
        seqs = run(model, prompts, eos=6, **params)
        monkeypatch.setattr(model, "forward", forward)
        return seqs, widths

    whole, whole_widths = decode_with(1024)
    chunked, chunked_widths = decode_with(4)
    assert [s.output_ids for s in chunked] == [s.output_ids for s in whole]
    assert [s.prompt_logprobs for s in chunked] == [s.prompt_logprobs for s in whole]
    fused = 3 if mode == "quad_spec" else 0  # quad_spec's prefill ends with a MASK block
    assert whole_widths[0] == 20 + fused and chunked_widths[:5] == [4, 4, 4, 4, 4 + fused]  # one batch, 20 slots
    assert [s.metrics.prefill_nfe for s in chunked] == [-(-len(p) // 4) for p in prompts]


@pytest.mark.parametrize("mode", MODES)
def test_a_prefill_in_chunks_caches_what_one_pass_caches(monkeypatch, mode):
    """The invariant behind the test above, against one pass: every row's cache holds its
    prompt's keys and values bit for bit, and nothing more."""
    from blockdiff.decoding import batch as batching
    from blockdiff.decoding.batch import DecodeBatch
    from blockdiff.decoding.decoders import DECODERS

    model = tiny_model(4, vocab=24)
    prompts = [list(range(1, 12)), [5] * 3, list(range(20, 0, -1))]

    def prefilled(chunk):
        monkeypatch.setattr(batching, "PREFILL_CHUNK", chunk)
        seqs = [Sequence(p, SamplingParams(mode=mode, max_new_tokens=4, block_length=3)) for p in prompts]
        batch = DecodeBatch(model, seqs, DECODERS[mode].extra_slots(seqs[0]))
        with torch.inference_mode():
            DECODERS[mode].start(batch)
        return batch.cache, [s.output_ids for s in seqs]

    (whole, first), (chunked, chunked_first) = prefilled(1024), prefilled(4)
    assert chunked.lengths.tolist() == whole.lengths.tolist() == list(map(len, prompts))
    for row, n in enumerate(map(len, prompts)):
        assert torch.equal(chunked.k[:, row, :, :n], whole.k[:, row, :, :n])
        assert torch.equal(chunked.v[:, row, :, :n], whole.v[:, row, :, :n])
    assert chunked_first == first
