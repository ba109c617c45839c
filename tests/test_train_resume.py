"""Runs survive SIGKILL and resume exactly; damaged checkpoints are refused, not loaded."""
import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from support.train import cli, make_workspace, write_config
from blockdiff.cli import main
from blockdiff.errors import CheckpointError
from blockdiff.train import checkpoint as ckpt
from blockdiff.train.loop import resolve_resume

pytestmark = pytest.mark.slow  # processes, servers or a browser: `make test` only


def _final(run: str) -> dict:
    return load_file(os.path.join(run, "final", "model.safetensors"))


def _losses(run: str) -> dict:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    raw = make_workspace(tmp_path)
    raw["optim"]["max_steps"] = 12
    raw["run"]["save_every"] = 3
    cfg = write_config(tmp_path, raw)
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    reference = cli("train", "--config", cfg, "--run.out_dir", whole)
    victim = cli("train", "--config", cfg, "--run.out_dir", cut, "--run.throttle_s", "1.0")  # margin for a loaded machine
    assert reference.wait(timeout=120) == 0
    deadline = time.time() + 90
    while not os.path.isdir(os.path.join(cut, "checkpoints", "step-00000006")):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in steps 7-8, possibly inside a save
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not os.path.isdir(os.path.join(cut, "final"))
    assert max(_losses(cut)) < 12
    resumed = cli("train", "--config", cfg, "--run.out_dir", cut, "--resume")
    assert resumed.wait(timeout=120) == 0
    a, b = _final(whole), _final(cut)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit
    assert _losses(cut) == _losses(whole)  # and the log has each step once, with the same values


def _save(run: str, step: int) -> str:
    return ckpt.save(run, step, {"w": torch.full((3,), float(step))}, {"s": step}, {"last_epoch": step},
                     {"torch": torch.get_rng_state()}, {"data": {}}, keep_last=5)


def test_corrupt_or_partial_checkpoints_are_refused(tmp_path):
    run = str(tmp_path / "run")
    _save(run, 3)
    newest = _save(run, 6)
    assert resolve_resume(run, "latest") == newest
    # bit rot in the newest checkpoint: refused with the reason, the previous good one is used
    with open(os.path.join(newest, "optimizer.pt"), "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    reports = []
    assert ckpt.latest_good(run, reports.append) == os.path.join(run, "checkpoints", "step-00000003")
    assert "optimizer.pt: sha256 does not match" in reports[0]
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_resume(run, newest)  # named explicitly: an error, no silent fallback
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load(newest)
    # a truncated file and a missing manifest are caught too
    older = os.path.join(run, "checkpoints", "step-00000003")
    with open(os.path.join(older, "weights.safetensors"), "r+b") as f:
        f.truncate(8)
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.verify(older)
    os.remove(os.path.join(older, "manifest.json"))
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.verify(older)
    assert ckpt.latest_good(run, reports.append) is None
    # the temporary directory of a killed save is never taken for a checkpoint, and is cleaned up
    os.makedirs(os.path.join(run, "checkpoints", ".step-00000009.tmp-abc"))
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6, 3]
    good = _save(run, 9)
    assert ckpt.latest_good(run) == good
    assert not any(".tmp-" in n for n in os.listdir(os.path.join(run, "checkpoints")))


def test_cli_refuses_a_bad_checkpoint_with_one_clear_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    bad = _save(run, 2)
    os.remove(os.path.join(bad, "rng.pt"))
    raw = make_workspace(tmp_path)
    cfg = write_config(tmp_path, raw)
    assert main(["train", "--config", cfg, "--run.out_dir", run, "--resume", bad]) == 2
    err = capsys.readouterr().err
    assert "rng.pt: listed in the manifest but missing" in err and "Traceback" not in err


def test_max_minutes_ends_a_run_early_saved_exported_and_resumable(tmp_path, capsys):
    raw = make_workspace(tmp_path)
    raw["optim"]["max_steps"] = 4
    raw["run"].update(save_every=100, progress=False)
    cfg, run = write_config(tmp_path, raw), str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run.out_dir", run, "--run.max_minutes", "0"]) == 0
    assert "run.max_minutes (0) reached at step 1 of 4" in capsys.readouterr().err
    assert list(_losses(run)) == [1]  # the deadline had passed when the first step ended
    assert ckpt.latest_good(run).endswith("step-00000001")  # saved although save_every is 100
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))
    assert main(["train", "--config", cfg, "--run.out_dir", run, "--resume"]) == 0  # no limit now
    assert list(_losses(run)) == [1, 2, 3, 4]
