"""A static KV cache with a valid length per row.

Every forward stores its new keys/values in the slots just past each row's valid length,
then attends over the valid prefix plus those slots. Whether the new entries become part
of the cache is decided afterwards, by `advance` (append) or by doing nothing
(attend-without-write: the slots past the valid length are scratch). `crop` rolls rows
back after rejected speculation. Rows may have different lengths (ragged acceptance).

A static cache plans every forward without reading the host: its tokens go to slots computed
on the device from a device copy of the lengths, and every forward attends over the whole
capacity. A forward's shapes and the addresses it touches then depend only on its (B, T), so
it can be captured once and replayed (model/step_graphs.py). The results are the same as a
dynamic cache's: the keys past a row's span are masked, and a masked key adds exact zeros
(model/attention.py).
"""
from __future__ import annotations

import torch

from blockdiff.config import ModelConfig
from blockdiff.model.attention import KEY_CHUNK


def aligned(n: int) -> int:
    """n slots rounded up to whole key chunks. A forward attends over an aligned span (the
    padding masked) and the capacity is aligned: with a ragged tail the softmax's exps and
    sums differ in the last bits between span lengths (model/attention.py)."""
    return -(-n // KEY_CHUNK) * KEY_CHUNK


class KVCache:
    def __init__(self, config: ModelConfig, batch: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", static: bool = False):
        capacity = aligned(capacity)
        shape = (config.num_layers, batch, config.num_kv_heads, capacity, config.head_dim)
        # Zeros, not empty: masked slots still enter the attention matmul and must be finite.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # the tensors k and v are the first `batch` rows of: rows past them are room for newcomers
        self._rows_k, self._rows_v = self.k, self.v
        self.lengths = torch.zeros(batch, dtype=torch.long)  # valid entries per row (CPU)
        self.capacity = capacity
        self._slots: torch.Tensor | None = None  # (B, T) where this forward's tokens go
        self._start: int | None = None  # the common start slot when every row has the same length
        self.span = 0  # keys a forward attends over: max(lengths) + T, aligned (static: the capacity)
        self.static = static
        # the lengths on the device, written by the host-side methods below (static caches only)
        self.device_lengths = self.lengths.to(device) if static else None

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def starts(self) -> torch.Tensor:
        """(B,) long: the slot each row's first new token goes to, its valid length (a static
        cache's copy on the device, which a captured forward reads)."""
        return self.device_lengths if self.static else self.lengths

    def check_room(self, num_new: int) -> int:
        """The slots a forward of `num_new` tokens needs; raises when they exceed the capacity."""
        needed = int(self.lengths.max()) + num_new
        if needed > self.capacity:
            raise RuntimeError(f"KV cache overflow: need {needed} slots, capacity {self.capacity}")
        return needed

    def begin(self, num_new: int) -> None:
        """Plan where a forward's `num_new` tokens are written; called once per forward."""
        needed = self.check_room(num_new)
        if self.static:
            self.span, self._start = self.capacity, None
            offsets = torch.arange(num_new, device=self.k.device)
            self._slots = self.starts[:, None] + offsets  # (B, T)
            return
        self.span = aligned(needed)
        if bool((self.lengths == self.lengths[0]).all()):
            self._start, self._slots = int(self.lengths[0]), None
        else:
            self._start = None
            offsets = torch.arange(num_new)
            self._slots = (self.lengths[:, None] + offsets).to(self.k.device)  # (B, T)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, Hkv, T, D) keys/values in the planned slots; return the (B, Hkv, span, D) views."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if self._start is not None:
            end = self._start + k_new.shape[2]
            k_cache[:, :, self._start:end] = k_new
            v_cache[:, :, self._start:end] = v_new
        else:
            index = self._slots[:, None, :, None].expand_as(k_new)  # (B, Hkv, T, D)
            k_cache.scatter_(2, index, k_new)
            v_cache.scatter_(2, index, v_new)
        return k_cache[:, :, :self.span], v_cache[:, :, :self.span]

    def advance(self, counts: torch.Tensor | list[int] | int) -> None:
        """Make the first `counts[b]` tokens of the last forward part of row b's cache."""
        self.lengths += torch.as_tensor(counts, dtype=torch.long)
        self._sync_device_lengths()

    def crop(self, lengths: torch.Tensor | list[int]) -> None:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if bool((lengths > self.lengths).any()) or bool((lengths < 0).any()):
            raise ValueError(f"crop can only shorten rows: {self.lengths.tolist()} -> {lengths.tolist()}")
        self.lengths = lengths.clone()
        self._sync_device_lengths()

    def keep_rows(self, rows: list[int]) -> None:
        """Keep these rows, in this order, and drop the others (finished sequences), so that
        later forwards skip them. When no kept row is overwritten before it is read (as
        `compacting_order` arranges), the moved rows are copied in place and the cache keeps
        its tensors' first len(rows) rows: a retirement copies the rows it moves, not the cache."""
        moves = {new: old for new, old in enumerate(rows) if new != old}
        index = torch.as_tensor(rows, dtype=torch.long)
        if moves.keys().isdisjoint(moves.values()):
            for new, old in moves.items():
                self.k[:, new] = self.k[:, old]
                self.v[:, new] = self.v[:, old]
            self.k, self.v = self._rows_k[:, :len(rows)], self._rows_v[:, :len(rows)]
        else:
            self.k = self._rows_k = self.k.index_select(1, index.to(self.k.device))
            self.v = self._rows_v = self.v.index_select(1, index.to(self.v.device))
        self.lengths = self.lengths.index_select(0, index)
        self._sync_device_lengths(resized=True)

    def merge(self, other: "KVCache") -> None:
        """Append `other`'s rows below this cache's (continuous batching admits newcomers this way).

        The merged capacity is the larger of the two; the shorter cache is zero-padded, which
        is safe because slots past a row's valid length are never attended to. The rows go in
        place where this cache's tensors have room (rows retired before, or grown for), so an
        admission copies its own rows; otherwise this cache moves to tensors with half as
        many rows again to spare.
        """
        rows, capacity = self.batch + other.batch, max(self.capacity, other.capacity)
        if capacity > self.capacity or rows > self._rows_k.shape[1]:
            spare = rows + self.batch // 2
            self._rows_k, self._rows_v = _regrown(self.k, spare, capacity), _regrown(self.v, spare, capacity)
        self._rows_k[:, self.batch:rows] = _pad_slots(other.k.to(self.k.device), capacity)
        self._rows_v[:, self.batch:rows] = _pad_slots(other.v.to(self.v.device), capacity)
        self.k, self.v = self._rows_k[:, :rows], self._rows_v[:, :rows]
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.capacity = capacity
        self._sync_device_lengths(resized=True)

    def _sync_device_lengths(self, resized: bool = False) -> None:
        """Copy the host's lengths into the device buffer in place (its address is part of a
        captured forward), or into a new one when the rows changed."""
        if not self.static:
            return
        if resized:
            self.device_lengths = self.lengths.to(self.k.device)
        else:
            self.device_lengths.copy_(self.lengths)


def compacting_order(keep: list[bool]) -> list[int]:
    """The rows to keep (keep[i] for row i), ordered for `KVCache.keep_rows` to copy the fewest:
    a kept row among the first sum(keep) stays where it is, and each kept row past them fills
    a dropped row's place."""
    n = sum(keep)
    order = list(range(n))
    holes = [row for row in range(n) if not keep[row]]
    movers = [row for row in range(n, len(keep)) if keep[row]]
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order


def _regrown(x: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
    """(layers, B, Hkv, C, D) -> (layers, rows, Hkv, capacity, D) holding x in its first B rows
    and zeros in the slots past C; the rows past B are left unwritten (a row is written whole
    before it is used)."""
    layers, batch, heads, slots, dim = x.shape
    out = x.new_empty(layers, rows, heads, capacity, dim)
    out[:, :batch, :, :slots] = x
    out[:, :batch, :, slots:] = 0
    return out


def _pad_slots(x: torch.Tensor, capacity: int) -> torch.Tensor:
    """(layers, B, Hkv, C, D) -> (layers, B, Hkv, capacity, D), zeros after the old slots."""
    extra = capacity - x.shape[3]
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra > 0 else x
