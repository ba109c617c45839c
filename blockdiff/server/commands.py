"""`blockdiff serve`: load the model once, then serve the OpenAI-compatible API with uvicorn."""
from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor

from blockdiff.engine.block_lengths import SPEC_DISABLE_HELP, spec_disable_batch_size_arg
from blockdiff.model.dtype import DTYPE_CHOICES
from blockdiff.model.quantize import QUANTIZATION_CHOICES, QUANTIZATION_HELP
from blockdiff.model.step_graphs import CUDA_GRAPHS_HELP
from blockdiff.sampling import MODES
from blockdiff.server.config import ServerConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible API (completions, chat, streaming)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ServerConfig()
    p.add_argument("--model", "--model-path", dest="model", default=None,
                   help="HF/NLD directory, .gguf file or a name in models/ (default: SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as 'model'")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES)
    p.add_argument("--quantization", default=d.quantization, choices=QUANTIZATION_CHOICES,
                   help=QUANTIZATION_HELP)
    p.add_argument("--device", default=d.device)
    p.add_argument("--cuda-graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    p.add_argument("--adapter", default=None, help="a LoRA draft adapter directory")
    p.add_argument("--mode", default=d.mode, choices=MODES, help="decoding mode for requests that set none")
    p.add_argument("--auto-modes", default=d.auto_modes,
                   help="comma-separated lossless modes that mode 'auto' chooses among (by measured tok/s)")
    p.add_argument("--block-length", type=int, default=d.block_length, help="default: per mode")
    p.add_argument("--spec-disable-batch-size", type=spec_disable_batch_size_arg, default=d.spec_disable_batch_size,
                   help=SPEC_DISABLE_HELP)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--max-running-requests", type=int, default=d.max_running_requests,
                   help="sequences decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="waiting requests allowed; more get 429")
    p.add_argument("--max-quad-block-length", type=int, default=d.max_quad_block_length)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger bodies get 413")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--graceful-timeout", dest="graceful_timeout_s", type=float, default=d.graceful_timeout_s,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def config_from_args(args) -> ServerConfig:
    fields = ServerConfig.__dataclass_fields__
    return ServerConfig(**{k: v for k, v in vars(args).items() if k in fields})


def on_a_passing_thread(make):
    """make() on a thread that ends when it returns; its result, or its exception re-raised.

    Loading times forwards (model/autotune.py), and with OpenMP (libgomp) every thread that runs
    a parallel region keeps a pool of worker threads for life. Once two live threads hold
    pools on a machine with fewer cores than their threads, libgomp stops spin-waiting between
    regions, and the engine thread's forwards ran 2x slower (benchmarks/RESULTS.md). A pool
    ends with its thread, so the engine thread is left the only one holding a pool."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockdiff-load") as loader:
        return loader.submit(make).result()  # the worker thread ends when the block exits


def cmd_serve(args) -> None:
    import torch
    import uvicorn

    from blockdiff.engine.llm import LLM
    from blockdiff.sampling import SamplingParams
    from blockdiff.server.app import build_app

    config = config_from_args(args)
    # bad defaults fail before the model loads
    SamplingParams(mode=config.mode, block_length=config.block_length, threshold=config.threshold)
    if config.max_running_requests < 1 or config.max_queue < 0:
        raise ValueError("--max-running-requests must be >= 1 and --max-queue >= 0")
    if config.threads:
        torch.set_num_threads(config.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = on_a_passing_thread(lambda: LLM(
        config.model, dtype=config.dtype, device=config.device, adapter=config.adapter,
        auto_modes=tuple(config.auto_modes.split(",")), quantization=config.quantization,
        cuda_graphs=config.cuda_graphs, max_batch_size=config.max_running_requests,
        spec_disable_batch_size=config.spec_disable_batch_size))
    app = build_app(llm, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level,
                timeout_graceful_shutdown=config.graceful_timeout_s)
