"""The training stage end to end on a cache whose target has been deleted: resume, sweeps, refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from extract.config import ExtractConfig, GenerationConfig, InputConfig, TargetConfig
from extract.run import run as extract
from helpers import accelerate_launch, compose_train, kill_once_saved, tiny
from tools.plot_run import plot as plot_run
from train.config import validate
from train.objective import draft_vocab
from train.data import token_budget_batches
from train.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_targets, demo_shards):
    """A three-shard cache extracted from a copy of the tiny target, which is then deleted."""
    tmp = tmp_path_factory.mktemp("train_cache")
    target = tmp / "qwen3_vl"
    shutil.copytree(tiny_targets / "qwen3_vl", target)
    from tools.fixtures.demo_shards import write_shards

    shards = list(demo_shards) + write_shards(tmp / "more", shards=1, samples=8, seed=9)
    extract(ExtractConfig(out=str(tmp / "cache"), target=TargetConfig(path=str(target), dtype="float32", device="cpu",
                                                                      layer_ids=[2, 4, 5]),
                          data=InputConfig(shards=",".join(map(str, shards))),
                          generation=GenerationConfig(max_new_tokens=24, batch_size=8), progress=False))
    shutil.rmtree(target)  # training must not need it
    return tmp / "cache"


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a step logged twice keeps its last row


# DFlash2 with D-PACE on the tiny target (hidden 64): the published convolution, a small selector.
DFLASH2 = ("drafter.architecture=dflash2", "drafter.conv_group_size=16", "drafter.selector_rank=16",
           "objective.weighting=dpace")


@pytest.mark.parametrize("mode, vocab, extra", [("dflash", "null", ()), ("vp", "null", ()), ("dflash", "200", ()),
                                                ("dflash", "null", DFLASH2)], ids=["dflash", "vp", "vocab", "dflash2"])
def test_training_learns_on_a_cache_without_its_target(cache, tmp_path, mode, vocab, extra):
    cfg = tiny(cache, tmp_path / "run", f"objective.mode={mode}", f"objective.draft_vocab_size={vocab}",
               "optim.max_steps=30", "optim.lr=3e-3", *extra)
    state = train(cfg)
    assert state.step == 30
    seq = losses(tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    selector_keys = {"selector_loss", "candidate_recall", "acceptance_estimate_unary"}
    # DFlash2 logs what its selector adds: its loss, the candidate set's recall, the unary path beside the selected.
    assert all(selector_keys <= set(r) for r in rows if "loss" in r) == bool(extra)
    assert any("eval/tau_replay_unary" in r for r in rows) == bool(extra)
    assert sorted(seq) == list(range(1, 31)) and all(np.isfinite(list(seq.values())))
    # Measured: the last five steps' mean loss is 0.84-0.88 of the first five's for the three modes (lr 3e-3);
    # 0.95 leaves room for other kernels and still fails a run that does not learn.
    assert np.mean([seq[s] for s in range(26, 31)]) <= 0.95 * np.mean([seq[s] for s in range(1, 6)])
    png = plot_run(tmp_path / "run", tmp_path / "curves.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000024", "step-00000028", "step-00000030"]  # keep_last=3, final included


@pytest.mark.parametrize("extra", [(), DFLASH2 + ("objective.selector_warmup=0.2", "objective.selector_ramp=0.3")],
                         ids=["dflash", "dflash2"])
def test_killed_and_resumed_run_reproduces_the_loss_sequence(cache, tmp_path, extra):
    """Equal to the digit whatever the machine's core count: both runs pin the same intra-op thread count."""
    train(tiny(cache, tmp_path / "straight", "threads=1", *extra))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train", "setup=tiny", f"data.cache={cache}", f"run_dir={run_dir}",
           "optim.max_steps=12", "log_every=1", "save_every=4", "eval_every=6", "progress=false",
           "objective.num_anchors=16", "threads=1", f"hydra.run.dir={tmp_path}/hydra", *extra]
    kill_once_saved(cmd, run_dir / "checkpoints" / "step-00000004")
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "state.json").exists())
    assert done  # wherever the kill landed, the rerun must end with the uninterrupted run's losses
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert losses(run_dir) == losses(tmp_path / "straight")
    assert sorted(losses(run_dir)) == list(range(1, 13))


@pytest.mark.parametrize("override, key", [("drafter.hidden_size=48", "drafter.hidden_size"),
                                           ("drafter.target_layer_ids=[1,4,5]", "drafter.target_layer_ids"),
                                           ("drafter.vocab_size=1000", "drafter.vocab_size"),
                                           ("+expect_target=Qwen/Qwen3-VL-8B-Instruct", "expect_target"),
                                           ("drafter.mask_token_id=5000", "drafter.mask_token_id")])
def test_drafter_cache_mismatch_is_refused_naming_the_key(cache, tmp_path, override, key):
    cfg = tiny(cache, tmp_path / "run", override.lstrip("+"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigCompositionException, match="optim.learning_rate"):
        compose_train("optim.learning_rate=3e-4", "data.cache=x")


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "setup").glob("*.yaml")))
def test_every_named_setup_composes_and_leaves_the_target_dimensions_to_the_cache(name):
    cfg = compose_train(f"setup={name}", "data.cache=x")
    validate(cfg)
    d = cfg.drafter
    # What the cache knows is never restated: a setup that did could contradict the cache it trains from.
    assert d.hidden_size is None and d.vocab_size is None and d.target_layer_ids is None
    assert d.mask_token_id is None  # resolved once, from the cache's tokenizer
    assert d.position_source == "sequential" and d.partial_rotary_factor == 1.0  # what serving engines feed
    # Real targets' setups train DFlash2 with D-PACE (measured best, BENCHMARKS.md); the demo's stays DFlash, which
    # vLLM's CPU build serves.
    assert (d.architecture, cfg.objective.weighting) == (("dflash", "decay") if name == "tiny" else
                                                         ("dflash2", "dpace"))
    assert (ROOT / "conf" / "target" / f"{name}.yaml").exists()  # a setup trains on its target's cache


def test_each_default_is_stated_once():
    """YAML group files state only what differs from the dataclass defaults."""
    from train.config import DataConfig, DrafterConfig, ObjectiveConfig, OptimConfig

    for group, schema in (("drafter", DrafterConfig), ("objective", ObjectiveConfig), ("optim", OptimConfig),
                          ("data", DataConfig)):
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            stated = OmegaConf.to_container(OmegaConf.load(path)) or {}
            same = [k for k, v in stated.items() if getattr(schema(), k, object()) == v]
            assert not same, f"{path.name} restates the defaults of {same}"


@pytest.mark.parametrize("override, key", [("optim.grad_accum=0", "optim.grad_accum"),
                                           ("objective.num_anchors=0", "objective.num_anchors"),
                                           ("objective.gamma=0", "objective.gamma"),
                                           ("objective.mode=eagle", "objective.mode"),
                                           ("drafter.position_source=axis1", "drafter.position_source"),
                                           ("data.num_workers=-1", "data.num_workers"),
                                           ("objective.weighting=lambda", "objective.weighting"),
                                           ("objective.dpace_alpha=1.5", "objective.dpace_alpha"),
                                           ("objective.normalizer=batch", "objective.normalizer"),
                                           ("objective.selector_ramp=2", "objective.selector_ramp"),
                                           ("drafter.architecture=eagle3", "drafter.architecture"),
                                           ("drafter.architecture=dflash2 drafter.conv_kernel_size=17",
                                            "drafter.conv_kernel_size")])
def test_impossible_settings_are_refused_naming_the_key(override, key):
    cfg = compose_train("setup=tiny", "data.cache=does-not-exist", *override.split())
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train(cfg)  # refused before the cache is opened


def test_sweep_gives_each_job_its_own_run_directory(cache, tmp_path):
    cmd = [sys.executable, "-m", "train", "-m", "setup=tiny", f"data.cache={cache}", "optim.lr=1e-3,2e-3",
           "optim.max_steps=2", "save_every=0", "eval_every=0", "progress=false", f"hydra.sweep.dir={tmp_path}/sweep"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints" / "step-00000002" / "state.json").exists()
    lrs = {json.loads((tmp_path / "sweep" / j / "checkpoints" / "step-00000002" / "config.json").read_text())
           ["optim"]["lr"] for j in ("0", "1")}
    assert lrs == {1e-3, 2e-3}


def test_token_budget_batches_cover_every_sample_once_within_budget():
    lengths = np.random.default_rng(0).integers(5, 300, 500)
    batches, skipped = token_budget_batches(lengths, max_tokens=1024, max_length=250, bucket=64, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == sorted(i for i in range(500) if lengths[i] <= 250) and skipped == int((lengths > 250).sum())
    assert all(max(lengths[i] for i in b) * len(b) <= 1024 for b in batches)
    again, _ = token_budget_batches(lengths, 1024, 250, 64, 1, 0)
    other, _ = token_budget_batches(lengths, 1024, 250, 64, 1, 1)
    assert again == batches and other != batches


def test_draft_vocab_keeps_the_most_frequent_tokens():
    freq = np.array([5, 0, 9, 9, 1, 7, 5])
    assert draft_vocab(torch.as_tensor(freq), 3).tolist() == [2, 3, 5]
    assert draft_vocab(torch.as_tensor(freq), 4).tolist() == [0, 2, 3, 5]  # a tie goes to the lower id
    with pytest.raises(ValueError, match="objective.draft_vocab_size"):
        draft_vocab(torch.as_tensor(freq), 0)


@pytest.mark.parametrize("extra", [(), DFLASH2], ids=["dflash", "dflash2"])
def test_accelerate_ddp_two_processes_see_disjoint_batches_and_end_with_identical_weights(cache, tmp_path, extra):
    """DFlash2's selector is used outside DDP's forward (by the loss): its gradients are averaged all the same."""
    from safetensors.torch import load_file

    from ddp_probe import digest

    run = tmp_path / "run"
    cmd = [*accelerate_launch(), str(ROOT / "tests" / "ddp_probe.py"), str(tmp_path), "setup=tiny",
           f"data.cache={cache}", f"run_dir={run}", "optim.max_steps=3", "eval_every=2", "save_every=2",
           "progress=false", "objective.num_anchors=16",
           "data.max_tokens_per_batch=512", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["batches"]) for r in ranks] == [3, 3]
    for epoch in {e for e, _ in ranks[0]["batches"]}:
        seen = [{i for e, batch in r["batches"] if e == epoch for i in batch} for r in ranks]
        assert seen[0] and seen[1] and not seen[0] & seen[1], ranks  # within an epoch no sample is trained twice
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients were averaged: the replicas agree
    saved = load_file(str(run / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert digest(saved) == ranks[0]["digest"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    # Rank 0 alone, eval_every=2 and the last step; both ranks agree on the best checkpoint it kept.
    assert [r["step"] for r in evals] == [2, 3] and np.isfinite(evals[0]["eval/loss"])
    best = max(evals, key=lambda r: r["eval/tau_replay"])["step"]
    assert json.loads((run / "best" / "state.json").read_text())["step"] == best
    assert 1 <= evals[0]["eval/tau_replay"] <= 8


@pytest.mark.parametrize("workers", [0, 1])
def test_padded_batches_equal_samples_padded_by_hand(cache, workers):
    """CacheDataset.batch reads hidden states straight into the batch (in shared memory inside a worker); every
    field equals the per-sample items padded naively with zeros to a multiple of PAD_MULTIPLE."""
    from cache_schema import CacheReader
    from train.data import PAD_MULTIPLE, CacheDataset, batch_loader

    reader = CacheReader(str(cache))
    dataset = CacheDataset(reader, reader.shards, "mrope_axis0")
    batches = [[3, 0, 5], [1], list(range(len(dataset)))[::-1]]
    for indices, got in zip(batches, batch_loader(dataset, batches, workers), strict=True):
        items = [dataset[i] for i in indices]
        T = max(len(x["input_ids"]) for x in items)
        T = -(-T // PAD_MULTIPLE) * PAD_MULTIPLE
        assert got["hidden"].shape[:2] == (len(indices), T) and got["hidden"].dtype == torch.bfloat16
        assert got["lengths"].tolist() == [len(x["input_ids"]) for x in items]
        assert got["sample_ids"].tolist() == [x["sample_id"] for x in items]
        for key in ("input_ids", "loss_mask", "positions", "hidden"):
            for b, x in enumerate(items):
                want = torch.zeros_like(got[key][b])
                want[:len(x[key])] = x[key]
                assert torch.equal(got[key][b].view(torch.int16) if key == "hidden" else got[key][b],
                                   want.view(torch.int16) if key == "hidden" else want), (indices, key, b)


def test_position_source_picks_mrope_axis0_or_sequential(cache):
    from cache_schema import CacheReader
    from train.data import CacheDataset

    reader = CacheReader(str(cache))
    axis0 = CacheDataset(reader, reader.shards, "mrope_axis0")
    seq = CacheDataset(reader, reader.shards, "sequential")
    with_images = [i for i in range(len(axis0)) if reader[axis0.index[i]].meta["num_image_tokens"] > 0]
    compressed = 0
    for i in with_images:
        cached = reader[axis0.index[i]].position_ids
        assert axis0[i]["positions"].tolist() == cached[0].tolist()
        assert seq[i]["positions"].tolist() == list(range(len(cached[0])))
        compressed += cached[0].tolist() != list(range(len(cached[0])))
    assert compressed  # M-RoPE holds axis 0 still across an image wider than one merged patch
    mixed = CacheDataset(reader, reader.shards, "mixed")
    drawn = [{"mrope_axis0": torch.equal(mixed[i]["positions"], axis0[i]["positions"]),
              "sequential": torch.equal(mixed[i]["positions"], seq[i]["positions"])} for i in with_images]
    assert all(sum(d.values()) == 1 for d in drawn)  # each sample one source, whole
    assert {k for d in drawn for k, v in d.items() if v} == {"mrope_axis0", "sequential"}  # both drawn
    assert torch.equal(mixed.batch(with_images)["positions"][0, :len(mixed[with_images[0]]["positions"])],
                       mixed[with_images[0]]["positions"])  # the batch path draws as the sample path
    with pytest.raises(ValueError, match="drafter.position_source"):
        CacheDataset(reader, reader.shards, "axis1")
