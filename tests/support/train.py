"""Shared pieces for the training tests (no tests here): a tiny corpus, tokenizer and config."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from blockdiff.train.tokenizer_train import save_tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def corpus_text(i: int) -> str:
    return (f"def func_{i}(x, y):\n    total = x + {i} * y\n    for k in range({i % 7 + 2}):\n"
            f"        total += k\n    return total\n\n\nclass Thing{i}:\n    value = {i}\n")


def make_workspace(root, n_files: int = 40, vocab: int = 300) -> dict:
    """Writes ROOT/corpus/*.py and ROOT/tok/; returns a raw config dict for a ~20k-param model."""
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for i in range(n_files):
        with open(os.path.join(corpus, f"m{i:03d}.py"), "w") as f:
            f.write(corpus_text(i))
    tok = train_tokenizer([corpus_text(i) for i in range(n_files)], vocab_size=vocab)
    save_tokenizer(tok, os.path.join(root, "tok"))
    return {
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
        "tokenizer": os.path.join(root, "tok"),
        "data": {"paths": [corpus], "seq_len": 16},
        "objective": {"block_size": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 8, "micro_batch": 4},
        "run": {"out_dir": os.path.join(root, "run"), "dtype": "fp32", "save_every": 4, "progress": False,
                "threads": 1},
    }


def write_config(root, raw: dict, name: str = "cfg.yaml") -> str:
    path = os.path.join(root, name)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def cli(*args: str, **popen) -> subprocess.Popen:
    """`python -m blockdiff.cli ARGS` in a fresh process (1 thread: the machine is shared)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "blockdiff.cli", *args], cwd=REPO, env=env, **popen)
