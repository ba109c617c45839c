"""Cache invariants, each checked against a full recompute without a cache."""
import pytest
import torch

from blockdiff.model.attention import KEY_CHUNK
from blockdiff.model.kv_cache import KVCache
from support.models import tiny_model


def full_logits(model, tokens):
    return model.logits(model(torch.tensor([tokens])))[0]  # (T, V), causal, no cache


@pytest.fixture
def model():
    return tiny_model(0, vocab=40)


def new_cache(model, batch=1):
    return KVCache(model.config, batch, 128)


@torch.inference_mode()
def test_append_matches_full_recompute(model):
    tokens = list(range(1, 21))
    cache = new_cache(model)
    first = model.logits(model(torch.tensor([tokens[:12]]), cache=cache)); cache.advance(12)
    pieces = [first[0]]
    for t in tokens[12:]:
        pieces.append(model.logits(model(torch.tensor([[t]]), cache=cache))[0]); cache.advance(1)
    torch.testing.assert_close(torch.cat(pieces), full_logits(model, tokens), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_attend_without_write_leaves_no_trace(model):
    prompt, block, tail = [3, 4, 5, 6, 7], [39, 39, 39, 39], [8, 9, 10]
    cache = new_cache(model)
    model(torch.tensor([prompt]), cache=cache); cache.advance(len(prompt))
    before = (cache.k.clone(), cache.v.clone(), cache.lengths.clone())
    hidden = model(torch.tensor([block]), cache=cache, pattern="bidirectional")
    assert torch.equal(cache.lengths, before[2])
    n = len(prompt)
    assert torch.equal(cache.k[:, :, :, :n], before[0][:, :, :, :n])
    # the block saw the prompt and itself, bidirectionally: compare with an explicit full mask
    T = n + len(block)
    sees = torch.ones(T, T, dtype=torch.bool).tril()
    sees[n:, n:] = True
    reference = model(torch.tensor([prompt + block]), pattern=sees)[0, n:]
    torch.testing.assert_close(hidden[0], reference, atol=1e-5, rtol=1e-5)
    # and the next causal tokens behave as if the block never happened
    logits = model.logits(model(torch.tensor([tail]), cache=cache))[0]
    torch.testing.assert_close(logits, full_logits(model, prompt + tail)[n:], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_crop_rolls_back_rejected_tokens(model):
    prompt, guess, tail = [1, 2, 3, 4], [20, 21, 22, 23, 24, 25], [30, 31]
    cache = new_cache(model)
    model(torch.tensor([prompt + guess]), cache=cache); cache.advance(len(prompt + guess))
    keep = len(prompt) + 2
    cache.crop([keep])
    logits = model.logits(model(torch.tensor([tail]), cache=cache))[0]
    expected = full_logits(model, prompt + guess[:2] + tail)[keep:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="only shorten"):
        cache.crop([keep + 1])


@torch.inference_mode()
def test_ragged_rows_each_match_their_own_recompute(model):
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    cache = new_cache(model, batch=2)
    padded = torch.tensor([rows[0], rows[1] + [0] * 4])
    model(padded, cache=cache); cache.advance([7, 3])
    step = torch.tensor([[11, 12], [13, 14]])
    logits = model.logits(model(step, cache=cache))  # (2, 2, V)
    for row in range(2):
        expected = full_logits(model, rows[row] + step[row].tolist())[-2:]
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)
    cache.keep_rows([1])
    assert cache.lengths.tolist() == [3]


def test_overflow_is_an_error(model):
    cache = KVCache(model.config, 1, 8)
    assert cache.capacity == KEY_CHUNK  # rounded up: forwards attend over aligned spans
    model(torch.zeros(1, KEY_CHUNK, dtype=torch.long), cache=cache)
    with pytest.raises(RuntimeError, match="overflow"):
        model(torch.zeros(1, KEY_CHUNK + 1, dtype=torch.long), cache=cache)


def test_compacting_order_fills_dropped_rows_from_the_tail():
    from blockdiff.model.kv_cache import compacting_order
    assert compacting_order([True, False, True, True, False, True]) == [0, 5, 2, 3]
    assert compacting_order([True, True, False]) == [0, 1]  # the tail dropped: nothing moves
    assert compacting_order([False, False, True]) == [2]
    assert compacting_order([False, False]) == []


@pytest.mark.parametrize("rows", [[0, 5, 2, 3], [0, 1, 2], [4], [3, 1, 0], [1, 0, 2]])
def test_keep_rows_keeps_each_rows_entries_and_copies_only_moved_rows(model, rows):
    """keep_rows(rows) holds exactly what index_select would; an order that reads no row after
    overwriting it is done in place, in the same tensors ([3, 1, 0] and [1, 0, 2] are not)."""
    cache = new_cache(model, batch=6)
    for tensor in (cache.k, cache.v):
        tensor.copy_(torch.randn(tensor.shape))
    cache.lengths = torch.arange(6) + 1
    expected_k, expected_v = cache.k.index_select(1, torch.tensor(rows)), cache.v.index_select(1, torch.tensor(rows))
    storage = cache.k.untyped_storage().data_ptr()
    cache.keep_rows(rows)
    assert torch.equal(cache.k, expected_k) and torch.equal(cache.v, expected_v)
    assert cache.lengths.tolist() == [row + 1 for row in rows]
    moves = {new: old for new, old in enumerate(rows) if new != old}
    in_place = moves.keys().isdisjoint(moves.values())
    assert (cache.k.untyped_storage().data_ptr() == storage) == in_place
    assert in_place == (rows not in ([3, 1, 0], [1, 0, 2]))


def filled_cache(model, batch, capacity, seed):
    cache = KVCache(model.config, batch, capacity)
    generator = torch.Generator().manual_seed(seed)
    for tensor in (cache.k, cache.v):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    cache.lengths = torch.arange(batch) + seed
    return cache


@pytest.mark.parametrize("newcomer_capacity", [KEY_CHUNK, 3 * KEY_CHUNK])
def test_merge_appends_rows_in_place_where_there_is_room(model, newcomer_capacity):
    """Merged rows hold what concatenating the zero-padded caches gives; after a retirement
    freed a row, a newcomer no larger goes into it in place, a larger one regrows the tensors."""
    cache = filled_cache(model, 4, 2 * KEY_CHUNK, seed=0)
    cache.keep_rows([0, 1, 3])  # frees a row
    newcomer = filled_cache(model, 1, newcomer_capacity, seed=7)
    capacity = max(cache.capacity, newcomer.capacity)
    expected = [torch.cat([torch.nn.functional.pad(a, (0, 0, 0, capacity - a.shape[3])) for a in pair], dim=1)
                for pair in ((cache.k, newcomer.k), (cache.v, newcomer.v))]
    storage = cache.k.untyped_storage().data_ptr()
    cache.merge(newcomer)
    assert torch.equal(cache.k, expected[0]) and torch.equal(cache.v, expected[1])
    assert cache.lengths.tolist() == [0, 1, 3, 7] and cache.capacity == capacity
    assert (cache.k.untyped_storage().data_ptr() == storage) == (newcomer_capacity <= 2 * KEY_CHUNK)


def test_admitting_one_row_at_a_time_regrows_now_and_then(model):
    cache = filled_cache(model, 8, KEY_CHUNK, seed=0)
    storages = set()
    for seed in range(1, 25):
        cache.merge(filled_cache(model, 1, KEY_CHUNK, seed))
        storages.add(cache.k.untyped_storage().data_ptr())
    assert cache.batch == 32 and len(storages) <= 4  # room for 13, 20, 31, then 47 rows
    assert cache.lengths.tolist() == list(range(8)) + list(range(1, 25))
