"""The command line, run as a user would, in a subprocess."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # processes, servers or a browser: `make test` only


def blockdiff(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "blockdiff.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_json(tiny_dir):
    r = blockdiff("generate", "the cat", "--model", tiny_dir, "--mode", "linear_spec", "--max-new-tokens", "7",
                  "--block-length", "4", "--json", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "metrics"} and out["mode"] == "linear_spec"
    assert out["metrics"]["generated_tokens"] == len(out["token_ids"]) <= 7
    assert {"nfe", "tpf", "steps", "acceptance", "wall_s", "tokens_per_s"} <= set(out["metrics"])


def test_compare_tabulates_every_mode(tiny_dir):
    r = blockdiff("compare", "the cat", "--model", tiny_dir, "--max-new-tokens", "8", "--block-length", "4",
                  "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[1].strip() == "mode" and len(rows) == 5
    same = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in rows[1:]}
    assert same["linear_spec"] == "yes" and same["quad_spec"] == "yes"  # lossless at temperature 0
    blocks = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in rows[1:]}
    assert blocks == {"ar": "-", "diffusion": "4", "linear_spec": "4", "quad_spec": "4"}


def test_bad_input_is_one_clear_line(tiny_dir, tmp_path):
    r = blockdiff("generate", "the cat", "--model", tiny_dir, "--threshold", "2")
    assert r.returncode == 2 and "threshold must be in [0, 1]" in r.stderr and "Traceback" not in r.stderr
    r = blockdiff("generate", "hi", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such model" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    r = blockdiff("generate", "hi", "--model", str(tmp_path / "broken"))
    assert r.returncode == 2 and "broken" in r.stderr and "Traceback" not in r.stderr
