"""Benchmark scripts end to end on a small budget: the load benchmark with a real server
process, real streaming clients and the report (a moved import once broke it only at the
report, after the run); the attention benchmark's table."""
import subprocess
import sys
from pathlib import Path

import pytest

from support.server import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_serve_load_runs_and_reports_on_tiny():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--tiny", "--port", str(free_port()),
           "--concurrency", "1,2", "--num-requests", "2", "--max-tokens", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| ")]
    assert [row[:3] for row in rows] == [["conc", "reqs", "errors"], ["1", "2", "0"], ["2", "2", "0"]]
    assert "aggregate output tok/s, concurrency 2 vs 1:" in done.stdout


def test_the_attention_benchmark_times_both_paths():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--widths", "1,8", "--cached", "40", "--repeats", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| ")]
    assert [row[0] for row in rows] == ["queries", "1", "8"]
    assert all(float(cell.rstrip("x")) > 0 for row in rows[1:] for cell in row[1:])
