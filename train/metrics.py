"""Training metrics to the console, a JSONL file and TensorBoard (when installed)."""

import json
import logging
from pathlib import Path

from train.objective import add_sums, step_metrics

log = logging.getLogger("train")


class MetricLog:
    """Sums step statistics between flushes (ratios of sums, so a slot's accuracy is averaged over the steps
    that scored it); `write` records a finished row (e.g. an evaluation)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.sums: dict = {}
        self.seconds = 0.0
        self.file = None
        self.tb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(run_dir) / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            log.info("tensorboard not installed: metrics go to metrics.jsonl and the console only")

    def add(self, sums: dict, seconds: float) -> None:
        add_sums(self.sums, sums)
        self.seconds += seconds

    def flush(self, step: int, **extra) -> dict:
        row = step_metrics(self.sums)
        row.update(extra, supervised_tokens_per_s=row["supervised_tokens"] / max(self.seconds, 1e-9))
        self.sums, self.seconds = {}, 0.0
        self.write(step, row)
        return row

    def write(self, step: int, row: dict) -> None:
        if not (self.enabled and row):
            return
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
        shown = {k: v for k, v in row.items() if not k.split("/")[-1].startswith("acc_")}
        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
