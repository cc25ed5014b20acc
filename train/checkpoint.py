"""Checkpoints: one directory per step, written under a temporary name and renamed into place, last k kept.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache_schema import Manifest

PREFIX = "step-"


@dataclass
class TrainState:
    """Everything beyond model/optimizer/scheduler tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # batches of `epoch` already consumed (per rank)
    tokens: int = 0  # supervised tokens seen


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def save(run_dir: Path, state: TrainState, model_state: dict, optimizer, scheduler, config: dict,
         keep_last: int, manifest: dict, draft_ids: torch.Tensor | None = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "cache_manifest.json").write_text(json.dumps(manifest, indent=2))
    if draft_ids is not None:
        save_file({"draft_ids": draft_ids.cpu().contiguous()}, str(tmp / "draft_vocab.safetensors"))
    (tmp / "state.json").write_text(json.dumps(asdict(state)))  # written last: marks the directory complete
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


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
    """A checkpoint directory as given, or a run directory's latest complete checkpoint."""
    path = Path(path)
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
    def cache_url(self) -> str | None:
        return self.train.data.cache

    @property
    def eval_shards(self) -> int:
        """The last this many committed shards of its cache were held out for evaluation."""
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
