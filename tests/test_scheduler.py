"""The one scheduler both front ends drive: admission, groups, updates, failures, auto's load."""
from __future__ import annotations

import pytest
import torch

from blockdiff.decoding import decoders
from blockdiff.decoding.sequence import Sequence
from blockdiff.engine.auto import AutoMode
from blockdiff.engine.request import Request
from blockdiff.engine.scheduler import Scheduler
from blockdiff.sampling import SamplingParams
from support.models import run, tiny_model

MODES = ["ar", "diffusion", "linear_spec", "quad_spec"]
PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10], [4, 4], [2, 9, 11], [6]]


def params(i: int, **overrides) -> SamplingParams:
    """A different mode, length and sampling for every prompt index."""
    fields = dict(mode=MODES[i % 4], max_new_tokens=5 + 3 * i, block_length=4,
                  temperature=0.8 if i % 3 == 2 else 0.0, seed=i)
    return SamplingParams(**(fields | overrides))


def requests_for(prompts, **overrides) -> list[Request]:
    return [Request(Sequence(p, params(i, **overrides), frozenset([6]))) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("max_running", [1, 2, 6])
def test_mixed_modes_admitted_over_time_equal_each_sequence_alone(max_running):
    """Whatever the room, the order of admission and the groups a sequence shares its steps
    with, its tokens are the ones it gets decoded alone (greedy and seeded sampled rows)."""
    model = tiny_model(6, vocab=24)
    scheduler = Scheduler(model, max_running=max_running)
    requests = requests_for(PROMPTS)
    for request in requests:
        scheduler.add(request)
    running = []
    while scheduler.has_work():
        scheduler.step()
        running.append(scheduler.num_running)
    assert max(running) <= max_running
    for i, request in enumerate(requests):
        alone = run(model, [PROMPTS[i]], eos=6, **vars(params(i)))[0]
        assert request.seq.output_ids == alone.output_ids, (i, request.seq.params.mode)
        assert request.done and request.seq.finish_reason in ("stop", "length")


def test_updates_add_up_to_the_output_and_end_once():
    model = tiny_model(6, vocab=24)
    scheduler = Scheduler(model, max_running=3)
    requests = requests_for(PROMPTS)
    for request in requests:
        scheduler.add(request)
    seen: dict[int, list] = {r.id: [] for r in requests}
    for request, update in scheduler.drain():
        seen[request.id].append(update)
    for request in requests:
        updates = seen[request.id]
        assert sum(u.new_tokens for u in updates) == len(request.seq.output_ids)
        assert updates[-1].token_ids == request.seq.output_ids
        assert [u.finish_reason is not None for u in updates] == [False] * (len(updates) - 1) + [True]
        assert updates[-1].metrics is not None and updates[-1].metrics.generated_tokens == len(request.seq.output_ids)
        assert updates[-1].metrics is not request.seq.metrics  # a snapshot, not shared state
        assert updates[0].since_previous is None and all(u.since_previous >= 0 for u in updates[1:])
        assert request.scheduled >= request.arrival


def test_a_failing_group_ends_with_errors_and_the_others_finish(monkeypatch):
    model = tiny_model(6, vocab=24)

    def broken(batch):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(decoders.DECODERS["linear_spec"], "step", broken)
    scheduler = Scheduler(model, max_running=6)
    requests = requests_for(PROMPTS[:4], temperature=0.0)
    for request in requests:
        scheduler.add(request)
    finals = {request.id: update for request, update in scheduler.drain() if update.finish_reason is not None}
    for request in requests:
        final = finals[request.id]
        if request.seq.params.mode == "linear_spec":
            assert final.finish_reason == "error" and "decode step failed: out of memory" in final.error
            assert isinstance(request.exception, RuntimeError)
        else:
            assert final.finish_reason in ("stop", "length") and request.exception is None
    assert not scheduler.has_work()


def test_aborted_requests_free_their_slot_at_the_next_step():
    model = tiny_model(6, vocab=24)
    scheduler = Scheduler(model, max_running=1)
    first, second = requests_for(PROMPTS[:2], max_new_tokens=40, mode="ar", ignore_eos=True)
    scheduler.add(first)
    scheduler.add(second)
    scheduler.step()
    assert scheduler.num_running == 1 and scheduler.num_waiting == 1
    first.aborted = True
    progress = scheduler.step()
    assert (first, "abort") in [(r, u.finish_reason) for r, u in progress]
    assert scheduler.num_running == 1 and second.scheduled is not None  # second took the slot


def test_auto_is_chosen_at_the_load_a_request_joins_and_steps_are_timed_at_the_load_they_ran():
    model = tiny_model(6, vocab=24)
    chosen, recorded = [], []

    class Watching(AutoMode):
        def choose(self, rows, ruled_out=frozenset()):
            chosen.append(rows)
            return "ar"

        def record(self, mode, rows, tokens, seconds):
            recorded.append(rows)

    scheduler = Scheduler(model, Watching(), max_running=3)
    requests = requests_for(PROMPTS[:5], mode="auto", max_new_tokens=30, temperature=0.0, ignore_eos=True)
    for request in requests[:2]:
        scheduler.add(request)
    scheduler.step()  # two admitted together: both see a load of 2
    for request in requests[2:]:
        scheduler.add(request)
    scheduler.step()  # one more fits beside the two running: load 3; two wait
    assert chosen == [2, 2, 3]
    assert recorded == [2, 3]
    assert all(r.seq.params.mode == "ar" for r in requests[:3])


def test_spec_groups_take_ar_steps_while_the_load_is_at_their_limit():
    """Four greedy spec rows and a limit of 2: AR steps while two or more run, drafts again when
    one is left; every row's tokens are `ar`'s, and auto hears the steps as the mode they ran."""
    model = tiny_model(6, vocab=24)
    recorded = []

    class Watching(AutoMode):
        def record(self, mode, rows, tokens, seconds):
            recorded.append((mode, rows))

    scheduler = Scheduler(model, Watching(), spec_limits={"linear_spec": 2, "quad_spec": 2})
    lengths = {"linear_spec": [6, 40], "quad_spec": [6, 12]}  # the 40-token row ends alone
    requests = [Request(Sequence(PROMPTS[i], SamplingParams(mode=mode, max_new_tokens=n, block_length=3,
                                                            ignore_eos=True), frozenset()))
                for i, (mode, n) in enumerate((m, n) for m, ns in lengths.items() for n in ns)]
    for request in requests:
        scheduler.add(request)
    list(scheduler.drain())
    for request in requests:
        alone = run(model, [request.seq.prompt_ids], max_new_tokens=request.seq.params.max_new_tokens,
                    ignore_eos=True)[0]
        assert request.seq.output_ids == alone.output_ids
    last = requests[1].seq.metrics
    assert 0 < last.verify_steps < last.steps  # AR steps under load, then speculation alone
    assert all(r.seq.metrics.verify_steps == 0 for r in requests if r is not requests[1])
    assert {mode for mode, rows in recorded if rows >= 2} == {"ar"}
    assert {mode for mode, rows in recorded if rows == 1} == {"linear_spec"}


def test_auto_does_not_place_requests_in_a_spec_mode_past_its_limit():
    model = tiny_model(6, vocab=24)
    scheduler = Scheduler(model, AutoMode(), spec_limits={"linear_spec": 2, "quad_spec": 4})
    requests = requests_for(PROMPTS[:3], mode="auto", max_new_tokens=8, temperature=0.0)
    for request in requests:
        scheduler.add(request)
    scheduler.step()  # a load of 3: linear_spec would take AR steps, quad_spec would not
    assert {r.seq.params.mode for r in requests} <= {"ar", "quad_spec"}


def test_a_group_with_a_seeded_sampled_request_always_speculates():
    """Its seed must give the same text at any load: an AR step samples other tokens."""
    model = tiny_model(6, vocab=24)
    sampled = dict(mode="linear_spec", max_new_tokens=12, block_length=3, temperature=0.8, ignore_eos=True)
    scheduler = Scheduler(model, spec_limits={"linear_spec": 2})
    requests = [Request(Sequence(p, SamplingParams(seed=i, **sampled), frozenset())) for i, p in enumerate(PROMPTS[:3])]
    for request in requests:
        scheduler.add(request)
    list(scheduler.drain())
    for i, request in enumerate(requests):
        assert request.seq.metrics.verify_steps == request.seq.metrics.steps > 0
        assert request.seq.output_ids == run(model, [PROMPTS[i]], seed=i, **sampled)[0].output_ids


def test_fail_all_ends_waiting_and_running_requests():
    model = tiny_model(6, vocab=24)
    scheduler = Scheduler(model, max_running=1)
    requests = requests_for(PROMPTS[:3], max_new_tokens=40, mode="ar", ignore_eos=True)
    for request in requests:
        scheduler.add(request)
    scheduler.step()
    progress = scheduler.fail_all("stopping")
    assert sorted(r.id for r, u in progress if u.finish_reason == "error") == sorted(r.id for r in requests)
    assert not scheduler.has_work()


def test_generate_raises_what_failed(monkeypatch, tmp_path):
    from blockdiff.engine.llm import LLM
    from support.models import save_tiny_checkpoint
    llm = LLM(save_tiny_checkpoint(tmp_path / "m"))

    def broken(batch):
        raise torch.cuda.OutOfMemoryError("no room")
    monkeypatch.setattr(decoders.DECODERS["ar"], "start", broken)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="no room"):
        llm.generate("the cat", mode="ar", max_new_tokens=4, use_tqdm=False)


def test_generate_hands_every_sequences_step_events_to_on_event(tmp_path):
    from blockdiff.engine.llm import LLM
    from support.models import save_tiny_checkpoint
    llm = LLM(save_tiny_checkpoint(tmp_path / "m"))
    events = []
    outs = llm.generate(["the cat", "hello there"], mode="linear_spec", block_length=4, max_new_tokens=10,
                        use_tqdm=False, on_event=lambda kind, payload: events.append((kind, payload)))
    committed = [t for kind, p in events if kind == "commit" for t in p["tokens"]]
    assert len(committed) == sum(len(o.token_ids) for o in outs) > 0
    assert {kind for kind, _ in events} == {"draft", "verify", "commit"}


def test_prompts_of_very_different_lengths_are_prefilled_apart_with_the_same_tokens(monkeypatch):
    """Right-padding a long prompt's batch-mates to its length would multiply the prefill's
    work: newcomers are prefilled in batches of similar lengths, and decode as they would alone."""
    from blockdiff.decoding import batch as batching
    from blockdiff.engine import scheduler as scheduling

    model = tiny_model(6, vocab=24)
    prompts = [[1, 2, 3], list(range(1, 20)) * 10, [4, 5], [7] * 150, [8, 9, 10, 11]]
    widths = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, *a, **k: widths.append(tuple(tokens.shape)) or forward(tokens, *a, **k))
    scheduler = Scheduler(model, max_running=8)
    requests = requests_for(prompts, mode="ar")
    for request in requests:
        scheduler.add(request)
    list(scheduler.drain())
    prefills = [(b, t) for b, t in widths if t > 1]  # ar's decode steps are one token wide
    assert prefills[0] == (3, 4)  # the short three together, first
    long_passes = [t for b, t in prefills[1:] if b == 2]  # then the two long ones together
    assert len(long_passes) == len(prefills) - 1 and sum(long_passes) == 190
    assert max(long_passes) <= batching.PREFILL_CHUNK
    padding = sum(b * t for b, t in prefills) - sum(map(len, prompts))
    assert padding <= scheduling.PREFILL_PADDING * sum(map(len, prompts))
    for prompt, request in zip(prompts, requests):
        alone = run(model, [prompt], eos=6, **vars(request.seq.params))[0]
        assert request.seq.output_ids == alone.output_ids


def test_prefill_chunks_keep_small_paddings_together():
    from blockdiff.engine.scheduler import prefill_chunks

    def lengths(chunks):
        return [[len(r.seq.prompt_ids) for r in chunk] for chunk in chunks]

    short = requests_for([[1] * n for n in (5, 1, 30)])  # 30 slots of padding: below the floor
    assert lengths(prefill_chunks(short)) == [[1, 5, 30]]
    mixed = requests_for([[1] * n for n in (100, 10, 110, 12, 400)])
    assert lengths(prefill_chunks(mixed)) == [[10, 12], [100, 110], [400]]
    assert lengths(prefill_chunks([])) == []


def test_a_long_prefill_takes_one_pass_a_step_while_others_decode(monkeypatch):
    """A prompt longer than PREFILL_CHUNK is cached a pass per step while another sequence
    decodes, which gets its token every step meanwhile; alone, it is prefilled in one step.
    Either way its tokens are the ones it gets decoded alone."""
    from blockdiff.decoding import batch as batching

    monkeypatch.setattr(batching, "PREFILL_CHUNK", 4)
    model = tiny_model(6, vocab=24)
    long_prompt = list(range(1, 22))  # 21 tokens: 5 passes ahead, the decoder's last with the fifth
    scheduler = Scheduler(model, max_running=4)
    short, late = requests_for([[1, 2, 3], long_prompt], mode="ar", max_new_tokens=20, ignore_eos=True)
    scheduler.add(short)
    scheduler.step()
    scheduler.add(late)
    steps_to_first_token = 0
    while not late.seq.output_ids:
        before = len(short.seq.output_ids)
        scheduler.step()
        steps_to_first_token += 1
        assert len(short.seq.output_ids) == before + 1  # one token every step meanwhile
    assert steps_to_first_token == 5
    list(scheduler.drain())
    for request, prompt in ((short, [1, 2, 3]), (late, long_prompt)):
        assert request.seq.output_ids == run(model, [prompt], eos=6, **vars(request.seq.params))[0].output_ids

    alone = Scheduler(model, max_running=4)
    (first,) = requests_for([long_prompt], mode="ar", max_new_tokens=20, ignore_eos=True)
    alone.add(first)
    alone.step()
    assert len(first.seq.output_ids) == 2  # prefill, first token and one decode step in one step


def test_a_request_aborted_while_its_prompt_is_being_cached_ends_there(monkeypatch):
    from blockdiff.decoding import batch as batching

    monkeypatch.setattr(batching, "PREFILL_CHUNK", 4)
    model = tiny_model(6, vocab=24)
    scheduler = Scheduler(model, max_running=4)
    short, late = requests_for([[1, 2, 3], list(range(1, 22))], mode="ar", max_new_tokens=20, ignore_eos=True)
    scheduler.add(short)
    scheduler.step()
    scheduler.add(late)
    scheduler.step()
    assert scheduler.num_running == 2 and late.seq.output_ids == []  # admitted, still prefilling
    late.aborted = True
    progress = scheduler.step()
    assert (late, "abort") in [(r, u.finish_reason) for r, u in progress]
    assert scheduler.num_running == 1 and not scheduler.prefilling
