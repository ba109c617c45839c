"""torchrun with 2 CPU processes (gloo) trains like 1 process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from support.train import REPO, cli, make_workspace, write_config

pytestmark = pytest.mark.slow  # processes, servers or a browser: `make test` only


def _losses(run: str) -> list[float]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _weights(run: str) -> dict:
    return load_file(os.path.join(run, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    raw = make_workspace(root)
    raw["optim"].update(max_steps=4, micro_batch=4)  # global batch 4
    raw["run"]["save_every"] = 100
    cfg = write_config(root, raw)
    run = str(root / "one")
    assert cli("train", "--config", cfg, "--run.out_dir", run).wait(timeout=120) == 0
    return root, cfg, run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(single, parallel):
    root, cfg, one = single
    run = str(root / parallel)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    # 2 processes x micro-batch 2 = the same global batch of 4 sequences
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "blockdiff.cli", "train", "--config", cfg, "--run.out_dir", run,
                           "--optim.micro_batch", "2", "--run.parallel", parallel],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == pytest.approx(_losses(one), rel=1e-5)
    a, b = _weights(one), _weights(run)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_gradient_accumulation_matches_one_big_batch(single):
    root, cfg, one = single
    run = str(root / "accum")
    assert cli("train", "--config", cfg, "--run.out_dir", run, "--optim.micro_batch", "1",
               "--optim.grad_accum", "4").wait(timeout=120) == 0
    assert _losses(run) == pytest.approx(_losses(one), rel=1e-5)
