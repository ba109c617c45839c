"""Training data: local text/code files, directories and JSONL, tokenised and packed.

A document is a list of (text, counts_in_loss) segments: plain files and {"text"} records
are one segment; {"prompt", "completion"} and chat {"messages"} records put the prompt in a
segment outside the loss, so the model learns the answers, not the questions. Documents are
tokenised, joined with an end-of-text token and cut into fixed-length sequences (packing:
no padding, a document may span two sequences). Everything is in sorted order, so the same
inputs always give the same sequences, which exact resumption relies on.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from blockdiff.tokenizer import Tokenizer
from blockdiff.train.config import DataConfig

Document = tuple[str, list[tuple[str, bool]]]  # (name, segments)


@dataclass
class PackedData:
    tokens: torch.Tensor  # (S, N) int64
    loss_mask: torch.Tensor  # (S, N) bool

    def __len__(self) -> int:
        return self.tokens.shape[0]


def expand_path(path: str) -> str:
    """`~` and `{stdlib}` (this interpreter's standard library source, which differs per machine)."""
    if "{stdlib}" in path:
        import sysconfig
        path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    return os.path.expanduser(path)


def list_files(paths: list[str], extensions: list[str], exclude_dirs: list[str]) -> list[str]:
    """Files named directly, plus those under directories with a listed extension, sorted."""
    out = []
    for path in paths:
        path = expand_path(path)
        if os.path.isfile(path):
            out.append(path)
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in exclude_dirs)
                out += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1] in extensions]
        else:
            raise ValueError(f"{path}: no such training data file or directory")
    return out


def _record_segments(record: dict, tokenizer: Tokenizer, where: str) -> list[tuple[str, bool]]:
    if "text" in record:
        return [(str(record["text"]), True)]
    if "prompt" in record and "completion" in record:
        return [(str(record["prompt"]), False), (str(record["completion"]), True)]
    if "messages" in record:
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{where}: a chat record must end with an assistant message")
        full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
        if not full.startswith(prompt):  # a template that rewrites earlier turns: learn it all
            return [(full, True)]
        return [(prompt, False), (full[len(prompt):], True)]
    raise ValueError(f"{where}: a JSONL record needs 'text', 'prompt'+'completion' or 'messages'")


def iter_documents(files: list[str], tokenizer: Tokenizer) -> Iterator[Document]:
    for file in files:
        if file.endswith(".jsonl"):
            with open(file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{file}:{n}: not JSON ({e})") from None
                        yield f"{file}:{n}", _record_segments(record, tokenizer, f"{file}:{n}")
        else:
            with open(file, encoding="utf-8", errors="replace") as f:
                yield file, [(f.read(), True)]


def is_validation(name: str, fraction: float) -> bool:
    """A stable split by document name: the same documents are held out on every run."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def tokenize_documents(docs: list[Document], tokenizer: Tokenizer, pad_to: int = 0) -> tuple[list[int], list[bool]]:
    """Concatenate documents, each followed by the end-of-text token (which is learned).

    pad_to > 0 repeats that token until the stream length is a multiple of pad_to, and learns the
    pads too. With pad_to = the diffusion block size, every document starts on a block boundary
    and the slots after its end are EOS targets, so a diffusion model learns where an answer stops
    (LLaDA pads its SFT answers with EOS for the same reason). Without it, the slots after an
    answer hold the next document's prompt, which is never a target.
    """
    sep = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    if pad_to and sep is None:
        raise ValueError("data.pad_to_block needs a tokenizer with an end-of-text token")
    texts = [text for _, segs in docs for text, _ in segs]
    encoded = tokenizer.tok.encode_batch(texts, add_special_tokens=False) if texts else []
    ids: list[int] = []
    mask: list[bool] = []
    k = 0
    for _, segs in docs:
        for _, in_loss in segs:
            piece = encoded[k].ids
            k += 1
            ids += piece
            mask += [in_loss] * len(piece)
        if sep is not None and (not ids or ids[-1] != sep):
            ids.append(sep)
            mask.append(True)
        if pad_to:
            pads = -len(ids) % pad_to
            ids += [sep] * pads
            mask += [True] * pads
    return ids, mask


def pack(ids: list[int], mask: list[bool], seq_len: int) -> PackedData:
    """Cut the stream into full sequences; the tail shorter than seq_len is dropped."""
    n = len(ids) // seq_len
    tokens = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (S, N)
    loss_mask = torch.tensor(mask[: n * seq_len], dtype=torch.bool).view(n, seq_len)  # (S, N)
    return PackedData(tokens, loss_mask)


def load_data(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[PackedData, PackedData | None]:
    """(train, validation or None) packed sequences from cfg.paths."""
    files = list_files(cfg.paths, cfg.extensions, cfg.exclude_dirs)
    if not files:
        raise ValueError(f"no training files with extensions {cfg.extensions} under {cfg.paths}")
    train_docs, val_docs, chars = [], [], 0
    for name, segs in iter_documents(files, tokenizer):
        (val_docs if is_validation(name, cfg.val_fraction) else train_docs).append((name, segs))
        chars += sum(len(t) for t, _ in segs)
        if cfg.max_tokens is not None and chars > 6 * cfg.max_tokens:  # a cheap bound: >= 1 char per token
            break
    ids, mask = tokenize_documents(train_docs, tokenizer, cfg.pad_to_block)
    if cfg.max_tokens is not None:
        ids, mask = ids[: cfg.max_tokens], mask[: cfg.max_tokens]
    train = pack(ids, mask, cfg.seq_len)
    if len(train) == 0:
        raise ValueError(f"{len(ids)} training tokens do not fill one sequence of {cfg.seq_len}")
    val = pack(*tokenize_documents(val_docs, tokenizer, cfg.pad_to_block), cfg.seq_len) if val_docs else None
    return train, (val if val is not None and len(val) else None)
