"""The shipped task set: loading it, and turning a task into the text the model decodes from.

Two kinds (provenance and format in tasks/README.md):
- code: HumanEval-format completion (signature + docstring -> body), scored by unit tests;
- qa:   short-answer questions, scored by normalised exact match against aliases.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
KINDS = ("code", "qa")

# Where a completion ends. The engine stops decoding at these; scoring.truncate_code cuts again
# at the first top-level line, since a block can overshoot and not every end is a stop string.
CODE_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#", "\n```"]
QA_STOP = ["\n"]
# Default decoding budgets: a body of these tasks fits in well under 128 tokens, an answer in 16.
DEFAULT_MAX_NEW_TOKENS = {"code": 128, "qa": 16}


@dataclass(frozen=True)
class CodeTask:
    task_id: str
    entry_point: str
    prompt: str  # signature + docstring, ends with a newline (HumanEval format)
    canonical_solution: str  # the body a correct model would write
    test: str  # defines check(candidate)
    kind: str = "code"


@dataclass(frozen=True)
class QATask:
    task_id: str
    question: str
    answers: tuple[str, ...]  # any one of these, after normalisation, is correct
    kind: str = "qa"


Task = CodeTask | QATask


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tasks(kinds: list[str] | tuple[str, ...] = KINDS, limit: int | None = None,
               task_dir: Path = TASK_DIR) -> list[Task]:
    """The tasks of each kind, in file order; `limit` keeps the first N of each kind."""
    tasks: list[Task] = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; allowed: {', '.join(KINDS)}")
        rows = _read_jsonl(task_dir / f"{kind}.jsonl")[:limit]
        if kind == "code":
            tasks += [CodeTask(r["task_id"], r["entry_point"], r["prompt"], r["canonical_solution"], r["test"])
                      for r in rows]
        else:
            tasks += [QATask(r["task_id"], r["question"], tuple(r["answers"])) for r in rows]
    return tasks


def fewshot_prefix(kind: str, task_dir: Path = TASK_DIR) -> str:
    return (task_dir / f"{kind}_fewshot.txt").read_text(encoding="utf-8")


def model_prompt(task: Task, prefix: str) -> str:
    """The exact text given to the model (raw completion, no chat template)."""
    if isinstance(task, CodeTask):
        # Without the trailing newline: byte-level BPE merges "\n" with the next line's
        # indentation, so the model should choose "\n    " itself (see tasks/README.md).
        return prefix + task.prompt.rstrip()
    return f"{prefix}Q: {task.question}\nA:"
