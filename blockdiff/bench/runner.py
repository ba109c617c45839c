"""Run every configuration and baseline round-robin on the same prompts, then score the outputs."""
from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blockdiff.bench.baselines import (hf_model, llama_cpp_model, run_generate, run_llama_cpp, run_prompt_lookup,
                                       sync_device)
from blockdiff.bench.prompts import encode_prompts, load_prompts
from blockdiff.bench.quality import score_samples
from blockdiff.bench.report import environment, model_info
from blockdiff.bench.results import Result, Run, Sample, compare_with_ar, perplexity_of, summarize
from blockdiff.bench.settings import BenchSettings, RunConfig


@dataclass
class BenchResult:
    settings: BenchSettings
    results: list[Result]
    environment: dict
    model: dict
    prompt_count: int
    command: str

    def to_dict(self) -> dict:
        return {"command": self.command, "environment": self.environment, "model": self.model,
                "settings": dataclasses.asdict(self.settings), "prompt_count": self.prompt_count,
                "results": [r.to_dict() for r in self.results]}


@dataclass
class _Job:
    name: str
    kind: str
    batch_size: int
    config: RunConfig | None
    run: Callable[[], Run]


def load_llm(settings: BenchSettings):
    from blockdiff.engine.llm import LLM
    return LLM(settings.model, dtype=settings.dtype, device=settings.device, adapter=settings.adapter,
               quantization=settings.quantization, cuda_graphs=settings.cuda_graphs,
               spec_disable_batch_size=settings.spec_disable_batch_size)


def time_blockdiff(llm, prompts: list[list[int]], params, batch_size: int) -> Run:
    """Decode `batch_size` prompts per generate() call; wall time is the calls', end to end."""
    device = llm.model.device
    samples, wall = [], 0.0
    for i in range(0, len(prompts), batch_size):
        sync_device(device)
        start = time.perf_counter()
        outs = llm.generate(prompts[i:i + batch_size], params, use_tqdm=False)
        sync_device(device)
        wall += time.perf_counter() - start
        samples += [Sample(o.token_ids, o.mode, o.metrics) for o in outs]
    return Run(samples, wall)


def _jobs(llm, settings: BenchSettings, prompts: list[list[int]], log: Callable[[str], None]) -> list[_Job]:
    jobs, warmed = [], set()
    for config in settings.run_configs(llm.block_lengths):
        params = settings.params(config)
        if (config.mode, config.block_length) not in warmed:
            # the first forward of each shape sets up kernels (oneDNN, CUDA): not decoding speed
            llm.generate(prompts[0], dataclasses.replace(params, max_new_tokens=min(4, params.max_new_tokens)),
                         use_tqdm=False)
            warmed.add((config.mode, config.block_length))
        jobs.append(_Job(config.label, "blockdiff", config.batch_size, config,
                         lambda p=params, b=config.batch_size: time_blockdiff(llm, prompts, p, b)))
    if settings.hf_baselines:
        hf = hf_model(llm)
        run_generate(hf, llm, prompts[:1], 4)  # warm-up, as above
        n = settings.max_new_tokens
        for b in settings.batch_sizes:
            jobs.append(_Job("hf generate()" + (f" bs{b}" if b != 1 else ""), "baseline", b, None,
                             lambda b=b: run_generate(hf, llm, prompts, n, b)))
        jobs.append(_Job(f"hf prompt lookup {settings.prompt_lookup_tokens}", "baseline", 1, None,
                         lambda: run_prompt_lookup(hf, llm, prompts, n, settings.prompt_lookup_tokens)))
    if settings.llama_cpp:
        model, skipped = llama_cpp_model(llm, torch.get_num_threads())
        if skipped:
            log(skipped)
        else:
            run_llama_cpp(model, llm, prompts[:1], 4)  # warm-up, as above
            jobs.append(_Job("llama.cpp", "baseline", 1, None,
                             lambda: run_llama_cpp(model, llm, prompts, settings.max_new_tokens)))
    return jobs


def run_bench(settings: BenchSettings, llm=None, log: Callable[[str], None] | None = None) -> BenchResult:
    """The whole sweep. Pass `llm` to reuse a loaded model (it must match settings' model/dtype)."""
    settings.validate()
    log = log or (lambda msg: None)
    llm = llm or load_llm(settings)
    prompts = encode_prompts(llm, load_prompts(settings.prompt_set, settings.num_prompts))
    jobs = _jobs(llm, settings, prompts, log)
    # Round-robin repeats spread the machine's noise over every job; each keeps its fastest run.
    best: dict[str, Run] = {}
    for rep in range(settings.repeats):
        for i, job in enumerate(jobs):
            run = job.run()
            if job.name not in best or run.wall_s < best[job.name].wall_s:
                best[job.name] = run
            tokens = sum(len(s.token_ids) for s in run.samples)
            log(f"[{rep + 1}/{settings.repeats}] [{i + 1}/{len(jobs)}] {job.name}: {tokens} tokens, "
                f"{tokens / run.wall_s if run.wall_s else 0:.1f} tok/s")
    results = [summarize(j.name, j.kind, j.batch_size, j.config, best[j.name]) for j in jobs]
    for r in results:  # scored after timing, so scoring never slows a timed run
        score_samples(llm.model, prompts, r.samples)
        r.perplexity = perplexity_of(r.samples)
    compare_with_ar(results)
    return BenchResult(settings, results, environment(), model_info(llm), len(prompts), shlex.join(sys.argv))

