"""Benchmark prompt sets: JSONL files of `{"prompt": text}` or `{"messages": [...]}` lines.

`chat` and `code` are shipped in blockdiff/bench/prompts/; any other name is read as a path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent / "prompts"


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: raw text, or a conversation for the model's chat template."""
    text: str | None = None
    messages: tuple[dict, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def resolve_prompt_set(name: str) -> Path:
    """A built-in set's name (chat, code) or a path to a JSONL file."""
    path = BUILTIN_DIR / f"{name}.jsonl"
    if "/" not in name and path.is_file():
        return path
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"{name}: no such prompt file, and not a built-in set ({', '.join(builtin_sets())})")
    return path


def _parse_line(obj) -> Prompt:
    """One decoded JSON line -> Prompt; raises ValueError with the reason (the caller adds where)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    keys = {"prompt", "messages"} & set(obj)
    if len(keys) != 1:
        raise ValueError('expected exactly one of "prompt" or "messages"')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError('"prompt" must be a non-empty string')
        return Prompt(text=obj["prompt"])
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f'messages[{i}] must be an object with string "role" and "content"')
    return Prompt(messages=tuple(messages))


def load_prompts(name: str, count: int | None = None) -> list[Prompt]:
    """Every prompt of a set, in file order; `count` truncates, or cycles the set to reach it
    (larger batches than the file has lines still measure full batches)."""
    path = resolve_prompt_set(name)
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (a trailing newline, a separator) carry no prompt
            try:
                prompts.append(_parse_line(json.loads(line)))
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{lineno}: {e}") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    if count is not None:
        if count < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {count}")
        prompts = [prompts[i % len(prompts)] for i in range(count)]
    return prompts


def encode_prompts(llm, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids exactly as LLM.generate / LLM.chat would build them."""
    ids = []
    for p in prompts:
        if p.is_chat:
            ids.append(llm.encode(llm.tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True),
                                  chat=True))
        else:
            ids.append(llm.encode(p.text))
    return ids
