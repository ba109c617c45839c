"""Which sequences each step trains on: a seeded shuffle per epoch and a resumable position.

The position is (epoch, index): `index` sequences of epoch `epoch`'s permutation are used.
The permutation depends only on (seed, epoch), so a run restarted from a saved position
sees exactly the sequences the uninterrupted run would have seen.
"""
from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, num_sequences: int, seed: int, epoch: int = 0, index: int = 0):
        if num_sequences <= 0:
            raise ValueError("no sequences to sample from")
        self.num_sequences, self.seed = num_sequences, seed
        self.epoch, self.index = epoch, index

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_sequences, generator=g)

    def take(self, count: int) -> list[int]:
        """The next `count` sequence ids of the global batch; crosses epochs as needed."""
        out: list[int] = []
        while len(out) < count:
            order = self._order(self.epoch)
            n = min(count - len(out), self.num_sequences - self.index)
            out += order[self.index: self.index + n].tolist()
            self.index += n
            if self.index == self.num_sequences:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "num_sequences": self.num_sequences, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_sequences"] != self.num_sequences:
            raise ValueError(f"the checkpoint was taken over {state['num_sequences']} training sequences, "
                             f"the data now gives {self.num_sequences}: the data or data config changed")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
