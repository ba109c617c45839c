"""Shared by the server tests: a tiny random checkpoint on disk and
a real uvicorn server on a free loopback port, run in a background thread."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import torch

from blockdiff.model.checkpoint import save_checkpoint
from support.models import tiny_model, tiny_tokenizer


def make_tiny_checkpoint(out_dir: str, seed: int = 0) -> str:
    """A random (but confident) model that shares the tiny BPE tokenizer; the last id is MASK."""
    tok = tiny_tokenizer()
    vocab = tok.vocab_size + 1
    model = tiny_model(seed, vocab=vocab, max_position_embeddings=512)
    model.config.eos_token_ids = list(tok.eos_token_ids)
    return save_checkpoint((model.config, model.state_dict(), tok), out_dir)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """The machine is shared: one thread is faster than contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def one_thread_llm(directory) -> Iterator:
    """A float32 LLM on a fresh tiny checkpoint in `directory`, torch on one thread while in use."""
    from blockdiff.engine.llm import LLM
    with one_torch_thread():
        yield LLM(make_tiny_checkpoint(str(directory / "tiny")), dtype="float32")


@contextmanager
def serving(llm, **config) -> Iterator["ServerThread"]:
    """A real uvicorn server for `llm`; `config` overrides ServerConfig fields."""
    from blockdiff.server.app import build_app
    from blockdiff.server.config import ServerConfig
    server = ServerThread(build_app(llm, ServerConfig(**{"model": llm.model_path, **config}))).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app, port: int | None = None):
        import uvicorn
        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
