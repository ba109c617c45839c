"""Run checkpoints that survive being killed at any instant.

A checkpoint is RUN/checkpoints/step-NNNNNNNN/ holding weights.safetensors (the trained
tensors), optimizer.pt, scheduler.pt, rng.pt, state.json (step, data position, config) and,
written last, manifest.json with the size and sha256 of every other file. Everything is first
written and fsynced in a temporary directory which is then renamed into place, so a kill
leaves either the old set of checkpoints or the new one, never a half-written step. A
checkpoint damaged afterwards (disk, copy, manual edits) fails its manifest check and is
refused with the reason; resuming then falls back to the newest good one.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blockdiff.errors import CheckpointError

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save(run_dir: str, step: int, weights: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
         rng: dict, state: dict, keep_last: int = 3) -> str:
    """Write checkpoint `step` atomically; keep the newest `keep_last`. Returns its path."""
    root = checkpoint_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=root)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(tmp, "weights.safetensors"))
        torch.save(optimizer, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler, os.path.join(tmp, "scheduler.pt"))
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "step": step}, f, indent=1)
        files = sorted(os.listdir(tmp))
        for name in files:
            _fsync(os.path.join(tmp, name))
        manifest = {"step": step, "files": {n: {"bytes": os.path.getsize(os.path.join(tmp, n)),
                                                "sha256": _sha256(os.path.join(tmp, n))} for n in files}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # a step saved again after resuming from an older checkpoint
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)  # make the rename itself durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every finished checkpoint directory, newest first (unverified)."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := _STEP_DIR.match(name))]
    return sorted(found, reverse=True)


def prune(run_dir: str, keep_last: int) -> None:
    for _, path in list_checkpoints(run_dir)[max(keep_last, 1):]:
        shutil.rmtree(path, ignore_errors=True)
    root = checkpoint_dir(run_dir)  # temporaries of killed saves
    for name in os.listdir(root):
        if name.startswith(".step-") and ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def verify(path: str) -> None:
    """Raise CheckpointError saying what is wrong, or return if every file matches the manifest."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}; it is written last)")
    try:
        with open(manifest_file) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_file}: unreadable manifest ({e})") from None
    for name, meta in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed in the manifest but missing")
        if os.path.getsize(file) != meta["bytes"]:
            raise CheckpointError(f"{file}: {os.path.getsize(file)} bytes, the manifest says {meta['bytes']} (truncated?)")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{file}: sha256 does not match the manifest (corrupt)")


def latest_good(run_dir: str, report=print) -> str | None:
    """The newest checkpoint that passes `verify`; bad newer ones are reported and skipped."""
    for _, path in list_checkpoints(run_dir):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            report(f"refusing checkpoint: {e}; falling back to an older one")
    return None


def load(path: str) -> dict[str, Any]:
    """Verify, then read every part of a checkpoint (tensors on CPU)."""
    verify(path)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    return {"weights": load_file(os.path.join(path, "weights.safetensors")),
            "optimizer": torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True),
            "scheduler": torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=True),
            "rng": torch.load(os.path.join(path, "rng.pt"), map_location="cpu", weights_only=True),
            "state": state, "path": path}
