"""Self-distillation data: the model's own greedy answers to a prompt set.

A draft adapter is only as fast as the verifier's acceptance of its drafts, so the best
training text for it is exactly what the verifier would write: its temperature-0 answers.
Prompts are a prompt set as `blockdiff bench` reads them (blockdiff.bench.prompts). Output
records are {"messages": [..., {"role": "assistant", ...}]} (or {"prompt", "completion"}
for raw prompts), the formats `blockdiff convert` trains on, prompt outside the loss.
Writing is append-only and resumable: records already in the output are skipped.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from blockdiff.bench.prompts import Prompt


def count_lines(path: str) -> int:
    """Complete records already written; a torn last line (a killed run) is cut off."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            f.truncate(keep)
    return data[:keep].count(b"\n")


def distill(llm, prompts: list[Prompt], out_path: str, *, batch_size: int, chat: bool,
            log: Callable[[str], None] = print, **params) -> int:
    """Answer prompts[done:] in batches, appending one record per prompt; returns records written."""
    done = count_lines(out_path)
    if done >= len(prompts):
        log(f"{out_path}: all {len(prompts)} prompts already answered")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    start, tokens = time.perf_counter(), 0
    with open(out_path, "a", encoding="utf-8") as out:
        for first in range(done, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            outputs = _answer(llm, batch, chat, params)
            for record, output in zip(batch, outputs):
                out.write(json.dumps(_with_answer(record, output.text, chat), ensure_ascii=False) + "\n")
                tokens += len(output.token_ids)
            out.flush()
            elapsed = time.perf_counter() - start
            log(f"{first + len(batch)}/{len(prompts)} prompts, {tokens} tokens, {tokens / elapsed:.1f} tok/s")
    return len(prompts) - done


def _conversation(prompt: Prompt) -> list[dict]:
    return list(prompt.messages) if prompt.is_chat else [{"role": "user", "content": prompt.text}]


def _answer(llm, batch: list[Prompt], chat: bool, params: dict):
    if chat:
        return llm.chat([_conversation(p) for p in batch], use_tqdm=False, **params)
    if any(p.is_chat for p in batch):
        raise ValueError("--raw needs {\"prompt\"} records; a {\"messages\"} record needs the chat template")
    return llm.generate([p.text for p in batch], use_tqdm=False, **params)


def _with_answer(prompt: Prompt, answer: str, chat: bool) -> dict:
    if not chat:
        return {"prompt": prompt.text, "completion": answer}
    return {"messages": [*_conversation(prompt), {"role": "assistant", "content": answer}]}
