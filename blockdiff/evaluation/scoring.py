"""Turn a model's raw completion into a verdict: cut code at the function's end and assemble
the test program; normalise short answers and compare them with the accepted aliases."""
from __future__ import annotations

import re
import string

from blockdiff.evaluation.tasks import CODE_STOP, CodeTask, QATask


def truncate_code(completion: str, stops: list[str] = CODE_STOP) -> str:
    """The body only: everything before the first stop string or the first non-blank line that
    starts at column 0 (the function has ended there), as HumanEval harnesses do.

    The text before the first newline continues the prompt's last line (the closing docstring
    quotes), so it is never taken for a top-level line.
    """
    for stop in stops:
        at = completion.find(stop)
        if at != -1:
            completion = completion[:at]
    first, newline, rest = completion.partition("\n")
    kept = [first]
    for line in rest.split("\n") if newline else []:
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    return "\n".join(kept).rstrip() + "\n"


def code_program(task: CodeTask, body: str) -> str:
    """The file the sandbox runs: the prompt as the model saw it, its body, the tests, the call."""
    return f"{task.prompt.rstrip()}{body}\n\n{task.test}\n\ncheck({task.entry_point})\n"


def reference_program(task: CodeTask) -> str:
    """The same file with the task's own solution; the tests check that it passes."""
    return code_program(task, "\n" + task.canonical_solution)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_answer(completion: str) -> str:
    """The answer is the first line of the completion (the few-shot format's stop is "\\n")."""
    return completion.strip().split("\n", 1)[0].strip()


def exact_match(answer: str, aliases: tuple[str, ...] | list[str]) -> bool:
    got = normalize_answer(answer)
    return any(got == normalize_answer(alias) for alias in aliases)


def score_qa(task: QATask, completion: str) -> bool:
    return exact_match(qa_answer(completion), task.answers)
