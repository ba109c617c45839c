"""Load test for `blockdiff serve`: N streaming clients at a time, on loopback, bounded in
request count and wall time. Reports req/s, output tok/s, TTFT / TPOT percentiles and errors
for each concurrency level, and the aggregate-throughput ratio of the highest level to 1.

    python benchmarks/serve_load.py --tiny                      # starts a server on a random tiny model
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-name NAME

A request counts as an error unless it streams to [DONE] with exactly --max-tokens tokens
(usage.completion_tokens; ignore_eos is set).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["the cat sat on", "hello there", "def main():", "the mat", "return 0", "cat sat", "hello", "on the"]


@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class Summary:
    concurrency: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    def row(self) -> list[str]:
        ok = self.ok()
        tokens = sum(r.tokens for r in ok)
        ttft = [r.ttft * 1000 for r in ok]
        tpot = [(r.e2e - r.ttft) / (r.tokens - 1) * 1000 for r in ok if r.tokens > 1]
        return [str(self.concurrency), str(len(self.results)), str(len(self.results) - len(ok)),
                f"{len(ok) / self.wall:.2f}", f"{tokens / self.wall:.1f}",
                *(f"{percentile(ttft, q):.1f}" for q in (50, 90, 99)),
                *(f"{percentile(tpot, q):.2f}" for q in (50, 90, 99))]

    def tok_s(self) -> float:
        return sum(r.tokens for r in self.ok()) / self.wall


HEADER = ["conc", "reqs", "errors", "req/s", "out tok/s", "TTFT p50 ms", "p90", "p99", "TPOT p50 ms", "p90", "p99"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one(client: httpx.AsyncClient, url: str, body: dict, expected: int) -> Result:
    result, start = Result(), time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Result(error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(error=chunk["error"]["message"])
                if chunk.get("choices") and chunk["choices"][0].get("text") and not result.ttft:
                    result.ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
        result.e2e = time.perf_counter() - start
        result.ttft = result.ttft or result.e2e
        if not done or result.tokens != expected:
            result.error = f"stream ended early or with {result.tokens} tokens, expected {expected}"
    except (httpx.HTTPError, ValueError) as e:
        result.error = repr(e)
    return result


async def run_level(base: str, args, concurrency: int) -> Summary:
    summary = Summary(concurrency)
    queue = list(range(args.num_requests))
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop()
                body = {"model": args.model_name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True, "mode": args.mode,
                        "stream_options": {"include_usage": True}}
                if args.block_length:
                    body["block_length"] = args.block_length
                summary.results.append(await one(client, base + "/v1/completions", body, args.max_tokens))

        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), args.level_timeout)
        summary.wall = time.perf_counter() - start
    return summary


def start_server(args) -> tuple[subprocess.Popen, str]:
    model = args.model
    if args.tiny:
        sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
        from support.server import make_tiny_checkpoint  # the tests' random tiny model
        model = make_tiny_checkpoint(os.path.join(tempfile.mkdtemp(), "tiny"))
    port = args.port
    cmd = [sys.executable, "-m", "blockdiff.cli", "serve", "--port", str(port),
           "--max-running-requests", str(args.max_running_requests), "--log-level", "warning",
           "--dtype", args.dtype, "--quantization", args.quantization, "--served-model-name", args.model_name]
    if model is not None:  # else the server's default model
        cmd += ["--model", model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": ROOT})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become healthy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="an already running server (default: start one)")
    p.add_argument("--model", default=None, help="model to serve when starting a server")
    p.add_argument("--tiny", action="store_true", help="serve the tests' random tiny model")
    p.add_argument("--model-name", default="bench")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default="none", help="the server's --quantization")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", default="linear_spec")
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--concurrency", default="1,32", help="comma-separated levels")
    p.add_argument("--num-requests", type=int, default=64, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-running-requests", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--level-timeout", type=float, default=600.0, help="a level is abandoned after this")
    args = p.parse_args()
    proc = None
    base = args.url
    if base is None:
        proc, base = start_server(args)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        summaries = [asyncio.run(run_level(base, args, c)) for c in levels]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    sys.path.insert(0, ROOT)
    from blockdiff.bench.report import format_table
    print(f"mode={args.mode} max_tokens={args.max_tokens} requests/level={args.num_requests} model={args.model_name}")
    print(format_table([s.row() for s in summaries], HEADER))
    if len(summaries) > 1 and summaries[0].tok_s() > 0:
        print(f"aggregate output tok/s, concurrency {levels[-1]} vs {levels[0]}: "
              f"{summaries[-1].tok_s() / summaries[0].tok_s():.1f}x")
    errors = [r.error for s in summaries for r in s.results if r.error]
    for e in errors[:5]:
        print("error:", e)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
