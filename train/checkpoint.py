"""Checkpoints: one directory per step, written under a temporary name and renamed into place, last k kept; the
best by replayed tau is kept apart as RUN/best, a complete checkpoint of the same layout.

    step-NNNNNNNN/model.safetensors    drafter parameters (the target's embedding and head are not in it)
    step-NNNNNNNN/config.json          the whole train config, drafter dimensions and mask id resolved
    step-NNNNNNNN/cache_manifest.json  the manifest of the cache it was trained from (target identity)
    step-NNNNNNNN/draft_vocab.safetensors  `draft_ids` [draft_vocab], ascending target ids (reduced vocabulary)
    step-NNNNNNNN/optim.pt             optimizer and scheduler state
    step-NNNNNNNN/state.json           TrainState, written last: marks the directory complete
"""

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache_schema import Manifest

PREFIX = "step-"
BEST = "best"  # RUN/best: the checkpoint of the best eval/tau_replay so far, never pruned by keep_last


@dataclass
class TrainState:
    """Everything beyond model/optimizer/scheduler tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # batches of `epoch` already consumed (per rank)
    tokens: int = 0  # supervised tokens seen
    evaluations: list = field(default_factory=list)  # [step, eval/tau_replay] of every evaluation that replayed

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, tau) of the best evaluation; a tie keeps the earlier one."""
        if not self.evaluations:
            return None
        step, tau = max(self.evaluations, key=lambda e: e[1])
        return step, tau

    @property
    def evals_since_best(self) -> int:
        taus = [tau for _, tau in self.evaluations]
        return len(taus) - 1 - taus.index(max(taus)) if taus else 0


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


@dataclass
class Snapshot:
    """What a checkpoint holds, gathered once per save."""

    state: TrainState
    model_state: dict
    optimizer: object
    scheduler: object
    config: dict
    manifest: dict
    draft_ids: torch.Tensor | None = None


def _write(final: Path, snap: Snapshot, linked_from: Path | None = None) -> Path:
    """The checkpoint directory `final`, complete or absent at every moment; `linked_from`, a checkpoint of the same
    snapshot, gives its files as hard links instead (copies where the file system has none)."""
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if linked_from is not None:
        for src in sorted(linked_from.iterdir(), key=lambda p: p.name == "state.json"):  # state.json last
            try:
                os.link(src, tmp / src.name)
            except OSError:
                shutil.copy2(src, tmp / src.name)
    else:
        save_file({k: v.detach().contiguous().cpu() for k, v in snap.model_state.items()},
                  str(tmp / "model.safetensors"))
        torch.save({"optimizer": snap.optimizer.state_dict(), "scheduler": snap.scheduler.state_dict()},
                   tmp / "optim.pt")
        (tmp / "config.json").write_text(json.dumps(snap.config, indent=2))
        (tmp / "cache_manifest.json").write_text(json.dumps(snap.manifest, indent=2))
        if snap.draft_ids is not None:
            save_file({"draft_ids": snap.draft_ids.cpu().contiguous()}, str(tmp / "draft_vocab.safetensors"))
        (tmp / "state.json").write_text(json.dumps(asdict(snap.state)))  # written last: marks it complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save(run_dir: Path, snap: Snapshot, keep_last: int) -> Path:
    """checkpoints/step-N, then the oldest beyond the last `keep_last` (0: all kept) are deleted."""
    final = _write(Path(run_dir) / "checkpoints" / f"{PREFIX}{snap.state.step:08d}", snap)
    for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def save_best(run_dir: Path, snap: Snapshot, linked_from: Path | None = None) -> Path:
    """RUN/best, replaced; `linked_from` is the step checkpoint just saved from the same snapshot, if any."""
    return _write(Path(run_dir) / BEST, snap, linked_from)


def load(path: Path, model, optimizer, scheduler) -> TrainState:
    path = Path(path)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    # weights_only: a run directory may come from elsewhere, and unpickling arbitrary objects would run its code.
    try:
        blob = torch.load(path / "optim.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}/optim.pt holds more than tensors and plain values; refused to unpickle it "
                         f"(it could run code): {str(e).splitlines()[0]}") from e
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return TrainState(**json.loads((path / "state.json").read_text()))


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given (RUN/best among them), or a run directory's latest complete checkpoint."""
    path = Path(path)
    if path.name == BEST and not path.exists() and (path.parent / "checkpoints").is_dir():
        raise ValueError(f"run directory {path.parent} has no best checkpoint yet: it is kept at the first evaluation "
                         "that replays tau (eval_every and eval_replay_samples above 0)")
    if (path / "checkpoints").is_dir():
        found = checkpoints(path)
        if not found:
            raise ValueError(f"run directory {path} holds no complete checkpoint")
        return found[-1]
    return path


def find_resume(run_dir: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise ValueError(f"resume={resume!r} is not a complete checkpoint directory (no state.json)")
    return path


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, without its weights: how it was trained and on which cache."""

    path: Path
    train: "TrainConfig"  # noqa: F821  the whole train config (drafter dimensions and mask id resolved)
    manifest: Manifest  # of the cache it was trained from

    @property
    def drafter(self) -> "DrafterConfig":  # noqa: F821
        return self.train.drafter

    @property
    def caches(self) -> list["CacheSource"]:  # noqa: F821
        """The caches it was trained from (`train.config.CacheSource`, named), the first one's manifest recorded."""
        return self.train.data.sources()

    @property
    def eval_shards(self) -> int:
        """The last this many committed shards of each of its caches were held out for evaluation."""
        return self.train.data.eval_shards


def read_checkpoint(path: Path) -> CheckpointInfo:
    """A checkpoint directory, or a run directory's latest checkpoint, read without its weights."""
    from train.config import from_dict

    path = resolve_checkpoint(path)
    if not (path / "state.json").exists():
        raise ValueError(f"{path} is not a complete drafter checkpoint (no state.json)")
    for name in ("config.json", "cache_manifest.json"):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a drafter checkpoint (no {name})")
    train = from_dict(json.loads((path / "config.json").read_text()), where=f"{path}/config.json")
    manifest = Manifest.from_dict(json.loads((path / "cache_manifest.json").read_text()),
                                  where=f"{path}/cache_manifest.json")
    return CheckpointInfo(path=path, train=train, manifest=manifest)


@dataclass
class DrafterCheckpoint(CheckpointInfo):
    """A trained drafter as evaluation, speculative decoding and export need it."""

    model: "Drafter" = None  # noqa: F821
    draft_ids: torch.Tensor | None = None  # ascending target ids of a reduced vocabulary


def load_drafter(path: Path, embed_VH: torch.Tensor | None = None,
                 lm_head_VH: torch.Tensor | None = None) -> DrafterCheckpoint:
    """A checkpoint (or run) directory -> the drafter with its weights; the target's embedding and head are the
    caller's (from the cache or the target model), or None for a headless drafter (export)."""
    from train.model import Drafter

    info = read_checkpoint(path)
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; the caller's RNG is left alone
        model = Drafter(info.drafter, embed_VH, lm_head_VH)
    model.load_state_dict(load_file(str(info.path / "model.safetensors")))
    vocab = info.path / "draft_vocab.safetensors"
    draft_ids = load_file(str(vocab))["draft_ids"] if vocab.exists() else None
    return DrafterCheckpoint(path=info.path, train=info.train, manifest=info.manifest, model=model.eval(),
                             draft_ids=draft_ids)
