"""What a run reports: a JSONL log (one object per logged step) and a tqdm progress bar."""
from __future__ import annotations

import json
import os

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends to RUN/metrics.jsonl. On resume, records past the resumed step (written by the
    killed run after its last checkpoint, and about to be redone) are dropped first."""

    def __init__(self, run_dir: str, resume_step: int | None):
        self.path = os.path.join(run_dir, METRICS_FILE)
        if resume_step is None:
            open(self.path, "w").close()
            return
        kept = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except ValueError:
                        pass  # a line cut short by the kill
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no metrics log (is {run_dir} a training run directory?)")
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


class Progress:
    """Steps done / total with loss, tokens/s and (from tqdm) the ETA; silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        post = {"loss": f"{record['loss']:.3f}", "ar": f"{record['ar_loss']:.3f}"}
        if record.get("diff_loss") is not None:
            post["diff"] = f"{record['diff_loss']:.3f}"
        post["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
