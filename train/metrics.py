"""Training metrics to the console and, through accelerate's trackers, to metrics.jsonl and the experiment
trackers named in `log_with` (TensorBoard, Weights & Biases, trackio, MLflow, ... where installed)."""

import json
import logging
from pathlib import Path

from accelerate.tracking import GeneralTracker, get_available_trackers
from accelerate.utils import LoggerType

from train.objective import add_sums, step_metrics

log = logging.getLogger("train")
TRACKERS = tuple(t.value for t in LoggerType if t is not LoggerType.ALL)


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker accelerate does not know or whose package is missing (accelerate would drop it silently)."""
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"log_with: {name!r} is not a tracker; choose from {', '.join(TRACKERS)}")
        if name not in installed:
            raise ValueError(f"log_with: {name!r} is not installed in this environment (installed: "
                             f"{', '.join(sorted(installed)) or 'none'}); install its package or drop it")


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
