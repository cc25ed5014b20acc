"""Training metrics to the console, a JSONL file and TensorBoard (when installed)."""

import json
import logging
from pathlib import Path

log = logging.getLogger("train")


class MetricLog:
    """Averages step metrics between flushes; `write` records a finished row (e.g. an evaluation)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0
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

    def add(self, values: dict, tokens: int, seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.tokens += tokens
        self.seconds += seconds

    def flush(self, step: int, **extra) -> dict:
        row = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        row.update(extra, supervised_tokens_per_s=self.tokens / max(self.seconds, 1e-9))
        self.sums, self.count, self.tokens, self.seconds = {}, 0, 0, 0.0
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
