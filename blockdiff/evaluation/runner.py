"""Decode every task in one decoding configuration and score it.

A configuration is (mode, block length, threshold). All prompts of a configuration, code and
QA together, go to one LLM.generate call so the engine batches them; each prompt carries its
own SamplingParams (stop strings, budget), which does not split the batch.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from blockdiff.evaluation.sandbox import SandboxLimits, run_programs
from blockdiff.evaluation.scoring import code_program, qa_answer, score_qa, truncate_code
from blockdiff.evaluation.tasks import (CODE_STOP, DEFAULT_MAX_NEW_TOKENS, QA_STOP, CodeTask, Task,
                                        fewshot_prefix, model_prompt)
from blockdiff.sampling import SamplingParams


@dataclass(frozen=True)
class DecodeConfig:
    mode: str
    block_length: int
    threshold: float  # used by diffusion; kept for every mode so a row is self-describing

    @property
    def label(self) -> str:
        label = f"{self.mode} L={self.block_length}"
        return f"{label} t={self.threshold:g}" if self.mode == "diffusion" else label


def configurations(modes: list[str], thresholds: list[float], block_length: int,
                   quad_block_length: int | None, default_threshold: float = 0.9) -> list[DecodeConfig]:
    """One configuration per mode; diffusion once per threshold (the accuracy-vs-TPF curve)."""
    configs = []
    for mode in modes:
        block = quad_block_length if mode == "quad_spec" and quad_block_length else block_length
        for t in (thresholds or [default_threshold]) if mode == "diffusion" else [default_threshold]:
            configs.append(DecodeConfig(mode, block, t))
    return configs


def sampling_params(config: DecodeConfig, kind: str, max_new_tokens: int | None) -> SamplingParams:
    """Greedy decoding (temperature 0): the score measures the mode, not sampling luck."""
    return SamplingParams(mode=config.mode, block_length=config.block_length, threshold=config.threshold,
                          temperature=0.0, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind],
                          stop=list(CODE_STOP if kind == "code" else QA_STOP))


@dataclass
class TaskResult:
    task_id: str
    kind: str
    completion: str  # what the model generated, untouched
    answer: str  # what was scored: the truncated body, or the first line of the answer
    passed: bool
    status: str  # passed | failed | timeout | wrong
    detail: str  # the sandbox's stderr tail, or the accepted answers
    generated_tokens: int
    nfe: int


@dataclass
class ConfigResult:
    config: DecodeConfig
    tasks: list[TaskResult]
    wall_s: float  # the generate call only; sandbox time is not decoding time
    steps: int = 0
    verify_steps: int = 0
    committed_in_verify: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)  # per kind, and "all"

    @property
    def generated_tokens(self) -> int:
        return sum(t.generated_tokens for t in self.tasks)

    @property
    def nfe(self) -> int:
        return sum(t.nfe for t in self.tasks)

    @property
    def tpf(self) -> float:
        """Token-weighted: all generated tokens over all decode forwards the sequences took part in."""
        return self.generated_tokens / self.nfe if self.nfe else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.generated_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.committed_in_verify / self.verify_steps if self.verify_steps else None

    def summary(self) -> dict:
        return {"label": self.config.label, **asdict(self.config), "accuracy": self.accuracy,
                "n": {k: sum(t.kind == k for t in self.tasks) for k in ("code", "qa")},
                "tpf": self.tpf, "tokens_per_step": self.tokens_per_step, "acceptance": self.acceptance,
                "generated_tokens": self.generated_tokens, "nfe": self.nfe, "wall_s": self.wall_s,
                "tokens_per_s": self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0}


def _accuracy(results: list[TaskResult]) -> dict[str, float]:
    acc = {}
    for kind in sorted({r.kind for r in results}):
        mine = [r for r in results if r.kind == kind]
        acc[kind] = sum(r.passed for r in mine) / len(mine)
    acc["all"] = sum(r.passed for r in results) / len(results) if results else 0.0
    return acc


def evaluate(llm, tasks: list[Task], config: DecodeConfig, *, max_new_tokens: int | None = None,
             limits: SandboxLimits = SandboxLimits(), workers: int = 4, use_tqdm: bool = False) -> ConfigResult:
    prefixes = {kind: fewshot_prefix(kind) for kind in {t.kind for t in tasks}}
    prompts = [model_prompt(t, prefixes[t.kind]) for t in tasks]
    params = [sampling_params(config, t.kind, max_new_tokens) for t in tasks]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    wall = time.perf_counter() - start

    code = [(i, t) for i, t in enumerate(tasks) if isinstance(t, CodeTask)]
    bodies = {i: truncate_code(outs[i].text) for i, _ in code}
    verdicts = dict(zip([i for i, _ in code],
                        run_programs([code_program(t, bodies[i]) for i, t in code], limits, workers)))
    results = []
    for i, (task, out) in enumerate(zip(tasks, outs)):
        if i in verdicts:
            v = verdicts[i]
            answer, passed, status, detail = bodies[i], v.passed, v.status, v.stderr_tail
        else:
            answer = qa_answer(out.text)
            passed = score_qa(task, out.text)
            status, detail = ("passed" if passed else "wrong"), " | ".join(task.answers)
        results.append(TaskResult(task.task_id, task.kind, out.text, answer, passed, status, detail,
                                  out.metrics.generated_tokens, out.metrics.nfe))
    ms = [o.metrics for o in outs]
    return ConfigResult(config, results, wall, steps=sum(m.steps for m in ms),
                        verify_steps=sum(m.verify_steps for m in ms),
                        committed_in_verify=sum(m.committed_in_verify for m in ms), accuracy=_accuracy(results))
