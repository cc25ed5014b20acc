"""Training metrics to the console and, through accelerate's trackers, to metrics.jsonl and the experiment
trackers named in `log_with` (TensorBoard, Weights & Biases, trackio, MLflow, ... where installed)."""

import json
import logging
import math
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker

log = logging.getLogger("train")


def step_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn summed statistics into the logged metrics, in one device-to-host transfer."""
    host = {k: v.tolist() if torch.is_tensor(v) else v for k, v in sums.items()}
    out = {"loss": host["loss_sum"] / host["weight"] if host["weight"] else math.nan,
           "acceptance_estimate": host["accepted"] / host["blocks"] if host["blocks"] else math.nan,
           "supervised_tokens": host["tokens"]}
    out.update({f"acc_{s}": h / n for s, (h, n) in enumerate(zip(host["slot_hits"], host["slot_scored"])) if n})
    if "selector_loss_sum" in host:  # DFlash2: what the selector adds over the unary argmax path
        out.update(selector_loss=host["selector_loss_sum"] / host["weight"] if host["weight"] else math.nan,
                   acceptance_estimate_unary=host["accepted_unary"] / host["blocks"] if host["blocks"] else math.nan,
                   candidate_recall=(host["candidate_hits"] / host["candidate_scored"] if host["candidate_scored"]
                                     else math.nan))
    if "skipped_steps" in host:
        out["skipped_steps"] = host["skipped_steps"]
    return out


def add_sums(into: dict, new: dict) -> dict:
    for k, v in new.items():
        into[k] = into[k] + v if k in into else v
    return into


class JsonlTracker(GeneralTracker):
    """metrics.jsonl (one row per logged step, appended across resumes) and run_config.json (what this start logged
    as its configuration): the tracker every run has."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.file = None

    def start(self):
        self.file = open(self.run_dir / "metrics.jsonl", "a")

    @property
    def tracker(self):
        return self.file

    def store_init_configuration(self, values: dict):
        (self.run_dir / "run_config.json").write_text(json.dumps(values, indent=2))

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def finish(self):
        self.file.close()


def flat(values: dict, prefix: str = "") -> dict:
    """Nested values as dotted keys of scalars, what every tracker's hyperparameter table takes (lists and None as
    JSON text)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def start_trackers(accelerator, project: str, run_dir: Path, config: dict) -> None:
    """Open every tracker (main process only) and log the run's configuration once."""
    name = Path(run_dir).name
    accelerator.init_trackers(project, config=flat(config),
                              init_kwargs={"wandb": {"name": name, "dir": str(run_dir)}, "trackio": {"name": name},
                                           "mlflow": {"run_name": name}})


class MetricLog:
    """Sums step statistics between flushes (ratios of sums, so a slot's accuracy is averaged over the steps
    that scored it); `write` records a finished row (e.g. an evaluation) in every tracker."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.sums: dict = {}
        self.seconds = 0.0

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
        if not (self.accelerator.is_main_process and row):
            return
        self.accelerator.log(row, step=step)
        shown = {k: v for k, v in row.items() if not k.split("/")[-1].startswith("acc_")}
        log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def close(self) -> None:
        for tracker in self.accelerator.trackers:
            tracker.finish()
