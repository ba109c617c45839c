"""Self-distillation data: the model's own greedy answers to a prompt set.

A draft adapter is only as fast as the verifier's acceptance of its drafts, so the best
training text for it is exactly what the verifier would write: its temperature-0 answers.
Output records are {"messages": [..., {"role": "assistant", ...}]} (or {"prompt",
"completion"} for raw prompts), the formats `blockdiff convert` trains on, prompt outside
the loss. Writing is append-only and resumable: records already in the output are skipped.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable


def read_prompts(path: str) -> list[dict]:
    """JSONL records with "prompt" (raw text) or "messages" (a chat without the answer)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str)
                                                    or isinstance(record.get("messages"), list)):
                raise ValueError(f"{path}:{n}: a prompt record needs 'prompt' (string) or 'messages' (list)")
            records.append(record)
    return records


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


def distill(llm, prompts: list[dict], out_path: str, *, batch_size: int, chat: bool,
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


def _answer(llm, batch: list[dict], chat: bool, params: dict):
    if chat:
        conversations = [r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]}]
                         for r in batch]
        return llm.chat(conversations, use_tqdm=False, **params)
    return llm.generate([r["prompt"] for r in batch], use_tqdm=False, **params)


def _with_answer(record: dict, answer: str, chat: bool) -> dict:
    if not chat:
        return {"prompt": record["prompt"], "completion": answer}
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    return {"messages": [*messages, {"role": "assistant", "content": answer}]}
