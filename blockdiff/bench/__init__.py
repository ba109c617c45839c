"""`blockdiff bench`: every decoding mode and transformers' baselines, same prompts, one report.

    from blockdiff.bench import BenchSettings, run_bench, markdown_report, write_outputs
    bench = run_bench(BenchSettings(model="tiny", prompt_set="code", block_lengths=[16, 32]))
    print(markdown_report(bench)); write_outputs(bench, "bench-out")
"""
from blockdiff.bench.report import markdown_report, write_outputs
from blockdiff.bench.runner import BenchResult, load_llm, run_bench
from blockdiff.bench.settings import BenchSettings, RunConfig

__all__ = ["BenchResult", "BenchSettings", "RunConfig", "load_llm", "markdown_report", "run_bench", "write_outputs"]
