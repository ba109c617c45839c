"""Decode-step forwards captured once per shape and replayed as CUDA graphs.

A decode step of a small model launches some 2,000 kernels, and on a GPU their launch cost,
not the arithmetic, sets the step time. Over a static cache (kv_cache.py) a forward's
kernels and the addresses they touch depend only on its shape: (B, T), the attention
pattern (a name, or a tensor pattern's shape: its values are an input), and whether
positions and an adapter gate are given. `StepGraphs` captures one graph per such shape the
first time it is run, then replays it: the inputs are copied into the graph's own buffers,
the graph runs, and its output is copied out (the next replay overwrites it).

A graph belongs to one cache's tensors. When they are replaced (a sequence retires, newcomers
merge in), the graphs captured on them are dropped and each shape is captured again on its
next forward. Forwards wider than `max_width` (prefills) run eagerly.

With capture=False the same buffers and the same static forward run eagerly without a graph:
on the CPU, which has no graphs, tests check everything but the capture itself this way.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from blockdiff.model.attention_mask import Pattern
from blockdiff.model.kv_cache import KVCache


@dataclass
class StepInputs:
    """A captured forward's input buffers, on the model's device; None where the shape has none."""
    tokens: torch.Tensor  # (B, T) long
    positions: torch.Tensor | None  # (B, T) long
    pattern: Pattern  # a name, or a (T, T) / (B, T, T) / (B, T, span) bool buffer
    gate: torch.Tensor | None  # (B, T), the caller's dtype

    @classmethod
    def like(cls, tokens, positions, pattern, gate, device) -> "StepInputs":
        def buffer(x):
            return None if x is None else torch.empty(x.shape, dtype=x.dtype, device=device)
        return cls(buffer(tokens), buffer(positions), pattern if isinstance(pattern, str) else buffer(pattern), buffer(gate))

    def fill(self, tokens, positions, pattern, gate) -> None:
        for buffer, value in ((self.tokens, tokens), (self.positions, positions), (self.pattern, pattern),
                              (self.gate, gate)):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)


@dataclass
class CapturedStep:
    inputs: StepInputs
    graph: "torch.cuda.CUDAGraph | None"  # None: run eagerly from the buffers
    hidden: torch.Tensor | None  # the graph's output buffer


def shape_key(tokens: torch.Tensor, positions, pattern: Pattern, gate) -> tuple:
    pattern_key = pattern if isinstance(pattern, str) else tuple(pattern.shape)
    return tuple(tokens.shape), pattern_key, positions is not None, gate is not None


CUDA_GRAPHS_HELP = "replay decode steps as captured CUDA graphs (needs --device cuda; model/step_graphs.py)"


class StepGraphs:
    """Called as the model is for a decode step: (tokens, positions, cache, pattern, gate) ->
    hidden states (B, T, hidden); the cache must be static."""

    def __init__(self, model: torch.nn.Module, capture: bool | None = None, max_width: int = 128):
        self.model = model
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.max_width = max_width
        # cache -> (the tensors its graphs write and read, {shape key: CapturedStep})
        self._steps: weakref.WeakKeyDictionary[KVCache, tuple[tuple, dict]] = weakref.WeakKeyDictionary()
        self.recorded = self.replayed = 0  # shapes recorded (captured) and forwards run from them

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: KVCache, pattern: Pattern,
                 adapter_gate: torch.Tensor | None = None) -> torch.Tensor:
        if not cache.static:
            raise ValueError("StepGraphs replays forwards over a static KVCache (KVCache(..., static=True))")
        if tokens.shape[1] > self.max_width:
            return self.model(tokens, positions, cache, pattern, adapter_gate)
        cache.check_room(tokens.shape[1])  # a replay runs no Python: check the capacity here
        steps = self._steps_of(cache)
        key = shape_key(tokens, positions, pattern, adapter_gate)
        step = steps.get(key)
        if step is None:
            step = steps[key] = self._record(tokens, positions, cache, pattern, adapter_gate)
            self.recorded += 1
        else:
            step.inputs.fill(tokens, positions, pattern, adapter_gate)
        self.replayed += 1
        if step.graph is None:
            return self._run(step.inputs, cache)
        step.graph.replay()
        return step.hidden.clone()

    def _steps_of(self, cache: KVCache) -> dict:
        tensors = (cache.k, cache.v, cache.device_lengths)
        held = self._steps.get(cache)
        if held is None or any(a is not b for a, b in zip(held[0], tensors)):
            held = self._steps[cache] = (tensors, {})  # the old graphs (and their memory) go
        return held[1]

    def _run(self, inputs: StepInputs, cache: KVCache) -> torch.Tensor:
        return self.model(inputs.tokens, inputs.positions, cache, inputs.pattern, inputs.gate)

    def _record(self, tokens, positions, cache, pattern, gate) -> CapturedStep:
        inputs = StepInputs.like(tokens, positions, pattern, gate, self.model.device)
        inputs.fill(tokens, positions, pattern, gate)
        if not self.capture:
            return CapturedStep(inputs, None, None)
        # Warm up outside the capture (library workspaces, lazily made device copies), on a
        # side stream as torch.cuda.graphs asks. The forward writes only the scratch slots past
        # each row's valid length, which no one has committed: running it more is harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(inputs, cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hidden = self._run(inputs, cache)
        return CapturedStep(inputs, graph, hidden)
