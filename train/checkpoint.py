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
import logging
import os
import pickle
import re
import shutil
import struct
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache_schema import Manifest
from cache_schema.disk import writing

log = logging.getLogger("train")
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
    nonfinite_run: int = 0  # optimizer steps skipped in a row for a non-finite gradient

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
    try:
        with writing("checkpoint", final):
            _fill(tmp, snap, linked_from)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _fill(tmp: Path, snap: Snapshot, linked_from: Path | None) -> None:
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


def safetensors_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, read without its data; ValueError naming what is cut
    short or unreadable (its length must be the header's plus the end of the last tensor it declares)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its header")
            n = struct.unpack("<Q", head)[0]
            size = os.fstat(f.fileno()).st_size
            if n > size:
                raise ValueError(f"declares a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        tensors = {k: t for k, t in header.items() if k != "__metadata__"}
        end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
        shapes = {k: list(t["shape"]) for k, t in tensors.items()}
    except (OSError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"unreadable ({e.__class__.__name__}: {e})") from e
    except ValueError as e:
        raise ValueError(f"unreadable ({e})") from e
    if size != 8 + n + end:
        raise ValueError(f"{size} bytes where its header declares {8 + n + end}")
    return shapes


def safetensors_damage(path: Path) -> str | None:
    try:
        safetensors_header(path)
    except ValueError as e:
        return str(e)
    return None


def declared_mismatch(shapes: dict[str, list[int]], d) -> str | None:
    """Where a config's drafter and the weights file's tensors disagree, found from the header alone: the model
    is built only after this, so a config declaring a huge model allocates nothing."""
    from train.model import Drafter

    layers = {int(k.split(".")[1]) for k in shapes if re.match(r"layers\.\d+\.", k)}
    if layers != set(range(d.num_layers)):
        return f"the config declares {d.num_layers} layers, the weights hold {len(layers)}"
    with torch.device("meta"):  # shapes only
        template = {k: list(v.shape) for k, v in Drafter(replace(d, num_layers=1), None, None)
                    .state_dict().items()}
    want = {k: v for k, v in template.items() if not k.startswith("layers.")}
    want.update({f"layers.{i}.{k[len('layers.0.'):]}": v for i in range(d.num_layers) for k, v in template.items()
                 if k.startswith("layers.")})
    for name in sorted(set(want) | set(shapes)):
        if name not in shapes:
            return f"the config's drafter has {name}, the weights do not"
        if name not in want:
            return f"the weights hold {name}, which the config's drafter has not"
        if shapes[name] != want[name]:
            return f"{name}: the config declares {want[name]}, the weights hold {shapes[name]}"
    return None


def damage(path: Path, weights_only: bool = False) -> str | None:
    """What is cut short or unreadable in a checkpoint directory (a node that died mid-write on storage without
    atomic rename), or None. `weights_only`: what evaluation and export read."""
    path = Path(path)
    names = ["config.json", "cache_manifest.json"] + ([] if weights_only else ["state.json"])
    for name in names:
        try:
            json.loads((path / name).read_text())
        except (OSError, ValueError) as e:
            return f"{name}: {e.__class__.__name__}: {e}"
    for name in ("model.safetensors", "draft_vocab.safetensors"):
        if (path / name).exists() or name == "model.safetensors":
            why = safetensors_damage(path / name)
            if why:
                return f"{name}: {why}"
    if not weights_only:
        try:
            with zipfile.ZipFile(path / "optim.pt") as z:  # torch.save's zip: every member's CRC is checked
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            return f"optim.pt is not a whole torch checkpoint (a zip archive), refused unread: {e}"
        if bad:
            return f"optim.pt: member {bad} fails its CRC"
    return None


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` takes the newest that loads, naming each one it passes over."""
    if resume == "never":
        return None
    if resume == "auto":
        passed = []
        for found in reversed(checkpoints(run_dir)):
            why = damage(found)
            if why is None:
                return found
            log.warning("passing over checkpoint %s, which is damaged (%s); resuming from an earlier one", found, why)
            passed.append(f"{found.name} ({why})")
        if passed:  # starting afresh would prune them (keep_last): the user decides
            raise ValueError(f"no checkpoint of {run_dir} loads: {'; '.join(passed)}; move them aside, or set "
                             "resume=never to start afresh in this directory")
        return None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise ValueError(f"resume={resume!r} is not a complete checkpoint directory (no state.json)")
    why = damage(path)
    if why:
        raise ValueError(f"resume={resume!r} is damaged: {why}")
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


def check_weights(info: CheckpointInfo) -> CheckpointInfo:
    """Refuse, before anything is built or loaded, a checkpoint whose weights are cut short or unreadable, or do
    not match its config (all read from the files' headers)."""
    why = damage(info.path, weights_only=True)
    if why:
        raise ValueError(f"checkpoint {info.path} is damaged: {why}; take another (RUN/checkpoints/step-N)")
    why = declared_mismatch(safetensors_header(info.path / "model.safetensors"), info.drafter)
    if why:
        raise ValueError(f"checkpoint {info.path}: config.json and model.safetensors disagree: {why}")
    return info


def load_drafter(path: Path, embed_VH: torch.Tensor | None = None,
                 lm_head_VH: torch.Tensor | None = None) -> DrafterCheckpoint:
    """A checkpoint (or run) directory -> the drafter with its weights; the target's embedding and head are the
    caller's (from the cache or the target model), or None for a headless drafter (export)."""
    from train.model import Drafter

    info = check_weights(read_checkpoint(path))
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; the caller's RNG is left alone
        model = Drafter(info.drafter, embed_VH, lm_head_VH)
    model.load_state_dict(load_file(str(info.path / "model.safetensors")))
    vocab = info.path / "draft_vocab.safetensors"
    draft_ids = load_file(str(vocab))["draft_ids"] if vocab.exists() else None
    return DrafterCheckpoint(path=info.path, train=info.train, manifest=info.manifest, model=model.eval(),
                             draft_ids=draft_ids)
