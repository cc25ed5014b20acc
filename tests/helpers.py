"""Small builders shared by tests: random cache samples and manifests."""

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cache_schema import Manifest, Sample, StorageInfo, TargetInfo

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def seeded(seed: int):
    """The global RNG seeded inside the block (for module initialisation) and left as it was after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_manifest(hidden_size=32, layers=(1, 3, 5), vocab=300, hidden_dtype="bf16", chunk_tokens=64,
                  compression="none", name="tiny-target", tokenizer="tok") -> Manifest:
    target = TargetInfo(name_or_path=name, model_type="qwen3", num_hidden_layers=8, hidden_size=hidden_size,
                        vocab_size=vocab, fingerprint=f"fp-{name}-{hidden_size}")
    return Manifest(target=target, target_layer_ids=list(layers),
                    storage=StorageInfo(hidden_dtype=hidden_dtype, chunk_tokens=chunk_tokens,
                                        compression=compression), tokenizer_fingerprint=tokenizer)


def make_sample(key: str, length: int, manifest: Manifest, seed: int) -> Sample:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    hidden = torch.randn(length, manifest.num_layers, manifest.target.hidden_size, generator=g) * 3
    hidden[:, :, 0] *= 40  # outlier channels, as real residual streams have
    positions = np.tile(np.arange(length, dtype=np.int32), (3, 1))
    return Sample(key=key, input_ids=rng.integers(0, manifest.target.vocab_size, length).astype(np.int32),
                  loss_mask=rng.random(length) < 0.5, position_ids=positions,
                  hidden_TLH=hidden.to(torch.bfloat16), meta={"num_image_tokens": int(rng.integers(0, 9))})


def write_target_files(writer, tmp_path, vocab_json: str = '{"a": 0, "b": 1}') -> dict:
    """Random head tensors and a two-file tokenizer folder (`vocab_json` its vocab.json), written through the writer;
    returns the head."""
    m = writer.manifest
    v, h = m.target.vocab_size, m.target.hidden_size
    g = torch.Generator().manual_seed(0)  # a fixed head, so tests that train on it do not depend on test order
    head = {"embed_tokens": torch.randn(v, h, generator=g), "lm_head": torch.randn(v, h, generator=g),
            "final_norm": torch.rand(h, generator=g)}
    tok = tmp_path / "tokenizer-src"
    (tok / "sub").mkdir(parents=True, exist_ok=True)
    (tok / "vocab.json").write_text(vocab_json)
    (tok / "sub" / "merges.txt").write_text("a b\n")
    writer.write_target_files(head, str(tok))
    return head


def counting_cache(root: Path, stride: int = 1, vocab_json: str = '{"a": 0, "b": 1}', **manifest_kw) -> str:
    """Two shards of six counting sequences (next token = this one + stride mod 8, so a few steps learn to draft
    them), two supervised turns each, every other sample with image tokens; the url of the cache. `vocab_json` is
    its tokenizer's vocab.json, the keywords go to `make_manifest`."""
    from cache_schema import CacheWriter

    url = str(root / "cache")
    manifest = make_manifest(**{"hidden_size": 32, "layers": (1, 3, 5), "vocab": 64, **manifest_kw})
    writer = CacheWriter(url, manifest)
    write_target_files(writer, root, vocab_json)
    for s in range(2):
        shard = writer.shard(f"shard-{s:03d}")
        for i in range(6):
            sample = make_sample(f"s{s}{i}", 48 + 8 * i, manifest, seed=10 * s + i)
            n = len(sample)
            sample.input_ids = ((np.arange(n) * stride + i) % 8).astype(np.int32)
            sample.loss_mask = np.zeros(n, dtype=bool)
            sample.loss_mask[4:20] = sample.loss_mask[26:] = True
            sample.meta = {"num_image_tokens": 12 * (i % 2)}
            shard.add(sample)
        shard.commit()
    return url


def accelerate_launch(processes: int = 2) -> list[str]:
    """The command line that starts `processes` ranks on this machine under `accelerate launch`, on a free port
    (the default one would be shared by tests running side by side)."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend",
            "no"]


def extract_config(out, shards, target_dir, **kw):
    """A small CPU extraction of `shards` with a tiny target (keyword arguments: ExtractConfig fields)."""
    from extract.config import ExtractConfig, GenerationConfig, InputConfig, TargetConfig

    target = TargetConfig(path=str(target_dir), dtype="float32", device="cpu",
                          layer_ids=kw.pop("layer_ids", [2, 4, 5]))
    return ExtractConfig(out=str(out), target=target,
                         data=InputConfig(shards=",".join(map(str, shards))),
                         generation=GenerationConfig(max_new_tokens=kw.pop("max_new_tokens", 16), batch_size=4,
                                                     max_length=kw.pop("max_length", 4096)), progress=False, **kw)


def compose_train(*overrides):
    """The train config as `python -m train OVERRIDES` composes it (run_dir left for the caller)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    cfg.run_dir = "unused"  # hydra's runtime output dir only exists inside a real run
    return OmegaConf.to_object(cfg)


def tiny(cache, run_dir, *overrides):
    """A short tiny-setup training run on `cache` into `run_dir`."""
    cfg = compose_train("setup=tiny", f"data.cache={cache}", "optim.max_steps=12", "log_every=1", "save_every=4",
                        "eval_every=6", "progress=false", "objective.num_anchors=16", *overrides)
    cfg.run_dir = str(run_dir)
    return cfg


def sequences(target, convs, regenerate=True, **settings) -> list:
    """`build_sequences` of `convs` under GenerationSettings(regenerate, **settings), one entry per conversation:
    its Sequence, or the SkipSample it was skipped with."""
    from extract.prompts import GenerationSettings, Prompts
    from extract.regenerate import build_sequences

    skips = {}
    built = build_sequences(Prompts(target, GenerationSettings(regenerate=regenerate, **settings)), convs,
                            lambda key, skip: skips.setdefault(key, skip))
    by_conv = {id(s.conv): s for s in built}
    return [by_conv.get(id(c), skips.get(c.key)) for c in convs]


def prompts_of(target, **settings):
    """A `Prompts` renderer of `target` under GenerationSettings(**settings)."""
    from extract.prompts import GenerationSettings, Prompts

    return Prompts(target, GenerationSettings(**settings))


def kill_once_saved(cmd: list[str], checkpoint: Path, timeout: float = 120) -> None:
    """Start `cmd` and SIGKILL it as soon as `checkpoint` is complete (its state.json written)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (checkpoint / "state.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
