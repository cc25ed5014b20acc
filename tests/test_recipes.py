"""Training the way published recipes are written: epochs, the best checkpoint by replayed tau (and stopping
early), several caches mixed by weight, experiment trackers; each on real caches and real training."""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate.tracking import get_available_trackers
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from extract.run import run as extract
from helpers import ROOT, compose_train, counting_cache, extract_config, kill_once_saved, tiny
from tools.demo import scenes
from tools.demo.pipeline import COMMITTED_TARGET
from train.caches import MixedDataset, open_caches, split
from train.config import CacheSource
from train.data import epoch_batches
from train.evaluate import evaluate_checkpoint
from train.export import export
from train.loop import train
from train.config import TRACKERS, check_trackers

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER_IDS = list(OmegaConf.load(ROOT / "conf" / "target" / "learned.yaml").layer_ids)


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[str, str]:
    """Two counting caches of one target: next token = this + 1 (mod 8) and this + 3."""
    root = tmp_path_factory.mktemp("recipes")
    return counting_cache(root / "one"), counting_cache(root / "three", stride=3)


def mixture(one: str, three: str, w_one=2, w_three=0.5) -> str:
    return f"data.caches=[{{url:{one},weight:{w_one},name:one}},{{url:{three},weight:{w_three},name:three}}]"


COUNTING = ("setup=tiny", "drafter.mask_token_id=63", "drafter.block_size=4", "optim.lr=1e-2", "progress=false",
            "log_every=1", "objective.num_anchors=16", "data.max_tokens_per_batch=256")


def counting_run(run_dir: Path, *overrides):
    cfg = compose_train(*COUNTING, *overrides)
    cfg.run_dir = str(run_dir)
    return cfg


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def checkpoint_step(path: Path) -> int:
    return json.loads((path / "state.json").read_text())["step"]


def test_epochs_decide_the_length_and_warmup_of_the_schedule(caches, tmp_path, capsys):
    cfg = counting_run(tmp_path / "run", mixture(*caches), "optim.epochs=3", "optim.warmup_ratio=0.25",
                       "optim.max_steps=7", "eval_every=0", "save_every=0")
    state = train(cfg)
    sources = cfg.data.sources()
    train_set, _ = split(sources, open_caches(sources), cfg.data.eval_shards, "sequential")
    per_epoch = [len(epoch_batches(train_set, cfg.data, cfg.seed, e)) for e in range(3)]
    assert state.step == sum(per_epoch) != 7  # optim.epochs wins over optim.max_steps
    assert (state.epoch, state.cursor) == (2, per_epoch[2])  # exactly three passes, nothing of a fourth
    warmup = math.ceil(0.25 * state.step)
    lr = {r["step"]: r["lr"] for r in rows(tmp_path / "run") if "lr" in r}
    assert lr[1] == pytest.approx(1e-2 * 2 / warmup) and lr[warmup] == pytest.approx(1e-2)
    assert lr[state.step] == pytest.approx(1e-2 * 0.1)  # the cosine ends at min_lr_ratio on the last step
    printed = capsys.readouterr().out
    assert f"an epoch is {per_epoch[0]} batches per process" in printed
    assert f"optim.epochs=3: {state.step} steps (optim.max_steps ignored)" in printed
    assert f"warmup {warmup} steps (optim.warmup_ratio=0.25)" in printed
    assert "one: weight 2, 12 samples per epoch" in printed and "three: weight 0.5, 3 samples per epoch" in printed


def test_mixture_draws_each_cache_by_weight_and_one_cache_trains_as_before(caches):
    sources = [CacheSource(caches[0], 2.0, "one"), CacheSource(caches[1], 0.5, "three")]
    readers = open_caches(sources)
    mix, _ = split(sources, readers, 1, "sequential")
    one, three = mix.parts
    data_cfg = compose_train(*COUNTING, "data.cache=x").data
    subsets = []
    for epoch in range(4):
        picks = mix.epoch_indices(0, epoch)
        assert picks.tolist() == mix.epoch_indices(0, epoch).tolist()  # deterministic for (seed, epoch)
        counts = Counter(picks.tolist())
        assert all(counts[i] == 2 for i in range(len(one)))  # weight 2: every sample twice
        drawn = sorted(i for i in counts if i >= len(one))
        assert len(drawn) == 3 and all(counts[i] == 1 for i in drawn)  # weight 0.5 of 6: three distinct samples
        subsets.append(drawn)
        batches = epoch_batches(mix, data_cfg, 0, epoch)
        assert sorted(i for b in batches for i in b) == sorted(picks.tolist())
    assert len({tuple(s) for s in subsets}) > 1  # a fresh subset each epoch
    batch = mix.batch([1, len(one) + 2])
    # Sample ids (which key the random draws) are per-cache indices offset by the caches before.
    assert batch["sample_ids"].tolist() == [one.index[1], len(readers[0]) + three.index[2]]
    for row, (part, i) in enumerate(((one, 1), (three, 2))):
        alone = part.batch([i])
        n = int(alone["lengths"][0])
        for key in ("input_ids", "loss_mask", "positions"):
            assert torch.equal(batch[key][row, :n], alone[key][0, :n])
        assert torch.equal(batch["hidden"][row, :n].view(torch.int16), alone["hidden"][0, :n].view(torch.int16))
    # One cache of weight 1 is the cache alone: the same batches, the same tensors, the same sample ids.
    single = MixedDataset([one], [1.0])
    for epoch in range(3):
        assert epoch_batches(single, data_cfg, 5, epoch) == epoch_batches(one, data_cfg, 5, epoch)
    got, want = single.batch([0, 3]), one.batch([0, 3])
    assert all(torch.equal(got[k].view(torch.int16) if k == "hidden" else got[k],
                           want[k].view(torch.int16) if k == "hidden" else want[k]) for k in want)


def test_killed_and_resumed_mixture_run_in_epochs_reproduces_the_loss_sequence(caches, tmp_path):
    overrides = [mixture(*caches), "optim.epochs=6", "save_every=3", "eval_every=5", "threads=1"]
    train(counting_run(tmp_path / "straight", *overrides))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train", *COUNTING, *overrides, f"run_dir={run_dir}",
           f"hydra.run.dir={tmp_path}/hydra"]
    kill_once_saved(cmd, run_dir / "checkpoints" / "step-00000003")
    straight = losses(tmp_path / "straight")
    done = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "state.json").exists())
    assert done  # wherever the kill landed, the rerun must end with the uninterrupted run's losses
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert losses(run_dir) == straight
    assert sorted(straight) == list(range(1, max(straight) + 1))


def test_evaluation_reports_tau_per_cache_and_pooled(caches, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(counting_run(run_dir, mixture(*caches, w_three=1), "optim.max_steps=30", "eval_every=15", "save_every=0"))
    logged = [r for r in rows(run_dir) if "eval/tau_replay" in r]
    assert [r["step"] for r in logged] == [15, 30]
    result = evaluate_checkpoint(run_dir, out=tmp_path / "eval", progress=False)
    # Training replayed the first eval_replay_samples (16 >= 6) held-out samples of each cache, as the CLI does.
    by_name = {c["name"]: c for c in result["caches"]}
    assert sorted(by_name) == ["one", "three"] and "cache" not in result
    for name, c in by_name.items():
        assert c["shards"] == ["shard-001"] and c["samples"] == 6
        assert logged[-1][f"eval/tau_replay/{name}"] == pytest.approx(c["dflash"]["all"]["tau"], abs=1e-12)
    pooled = result["dflash"]["all"]
    assert logged[-1]["eval/tau_replay"] == pytest.approx(pooled["tau"], abs=1e-12)
    assert pooled["cycles"] == sum(c["dflash"]["all"]["cycles"] for c in by_name.values())
    assert pooled["committed"] == sum(c["dflash"]["all"]["committed"] for c in by_name.values())
    assert "dflash  cache one" in capsys.readouterr().out
    alone = evaluate_checkpoint(run_dir, cache=caches[1], out=tmp_path / "alone", progress=False)
    assert alone["cache"] == caches[1] and alone["dflash"] == by_name["three"]["dflash"]
    with pytest.raises(ValueError, match="--cache"):
        evaluate_checkpoint(run_dir, shards="shard-001", out=tmp_path / "x", progress=False)


@pytest.mark.parametrize("other, field", [({"hidden_size": 48}, "target.hidden_size"),
                                          ({"layers": (2, 3, 5)}, "target_layer_ids"),
                                          ({"name": "another-target"}, "target.name_or_path"),
                                          ({"tokenizer": "tok-2"}, "tokenizer_fingerprint"),
                                          ({"vocab_json": '{"a": 0}'}, "tokenizer/vocab.json")])
def test_a_cache_of_another_target_or_tokenizer_is_refused_naming_the_field(caches, tmp_path, other, field):
    url = counting_cache(tmp_path / "other", **other)
    with pytest.raises(ValueError, match=rf"data\.caches\[1\] \({url}\) cannot be mixed.*{field}"):
        train(counting_run(tmp_path / "run", mixture(caches[0], url)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_caches_of_other_storage_or_generation_mix(caches, tmp_path):
    fp8 = counting_cache(tmp_path / "fp8", hidden_dtype="fp8_e4m3")
    readers = open_caches([CacheSource(caches[0]), CacheSource(fp8)])
    assert [r.manifest.storage.hidden_dtype for r in readers] == ["bf16", "fp8_e4m3"]


@pytest.mark.parametrize("overrides, message", [
    ((), r"data\.cache=URL or data\.caches"),
    (("data.cache=a", "data.caches=[{url:b}]"), "exactly one"),
    (("data.caches=[{url:a,weight:0}]",), r"data\.caches\[0\]\.weight=0"),
    (("data.caches=[{url:x/cache},{url:y/cache}]",), "named 'cache'"),
    (("data.cache=a", "optim.epochs=0"), r"optim\.epochs=0"),
    (("data.cache=a", "optim.warmup_ratio=1"), r"optim\.warmup_ratio"),
    (("data.cache=a", "eval_replay_samples=-1"), "eval_replay_samples"),
    (("data.cache=a", "early_stop_patience=2", "eval_every=0"), "early_stop_patience=2 needs"),
    (("data.cache=a", "log_with=[tensorbored]"), "log_with: 'tensorbored' is not a tracker")])
def test_impossible_recipe_settings_are_refused_before_anything_is_read(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(counting_run(tmp_path / "run", *overrides))


def test_a_tracker_that_is_not_installed_is_refused_and_an_unknown_cache_key_named():
    missing = [t for t in TRACKERS if t not in {str(x) for x in get_available_trackers()}]
    if missing:
        with pytest.raises(ValueError, match=f"log_with: '{missing[0]}' is not installed"):
            check_trackers([missing[0]])
    with pytest.raises(ConfigCompositionException, match="wieght"):
        compose_train("data.caches=[{url:a,wieght:2}]")


def test_config_and_caches_are_logged_once_at_start_and_metrics_every_step(caches, tmp_path):
    run_dir = tmp_path / "run"
    state = train(counting_run(run_dir, mixture(*caches), "optim.epochs=1", "eval_every=0", "save_every=0"))
    logged = json.loads((run_dir / "run_config.json").read_text())
    assert logged["optim.epochs"] == 1 and logged["schedule.total_steps"] == state.step
    assert logged["caches.one.url"] == caches[0] and logged["caches.three.weight"] == 0.5
    assert logged["caches.three.samples_per_epoch"] == 3 and logged["caches.one.train_samples"] == 6
    assert all(isinstance(v, (bool, int, float, str)) for v in logged.values())  # what every tracker's table takes
    assert sorted(losses(run_dir)) == list(range(1, state.step + 1))


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "trackio", "mlflow"])
def test_an_installed_tracker_logs_offline(caches, tmp_path, monkeypatch, tracker):
    if tracker not in {str(t) for t in get_available_trackers()}:
        pytest.skip(f"{tracker} is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run_dir = tmp_path / "run"
    state = train(counting_run(run_dir, f"data.cache={caches[0]}", "optim.max_steps=3", "eval_every=3",
                               "save_every=0", f"log_with=[{tracker}]"))
    assert state.step == 3 and sorted(losses(run_dir)) == [1, 2, 3]
    if tracker == "tensorboard":
        assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_best_is_refused_where_no_evaluation_kept_one(caches, tmp_path):
    from tools.spec_decode import prepare

    run_dir = tmp_path / "run"
    train(counting_run(run_dir, f"data.cache={caches[0]}", "optim.max_steps=2", "eval_every=0", "save_every=0"))
    for call in (lambda: evaluate_checkpoint(run_dir / "best", progress=False),
                 lambda: export(run_dir / "best", "speculators", tmp_path / "export"),
                 lambda: prepare("no-target-is-loaded", run_dir / "best")):
        with pytest.raises(ValueError, match="has no best checkpoint yet"):
            call()


def test_the_best_checkpoint_by_replayed_tau_is_the_best_of_those_saved_on_the_learned_target(tmp_path):
    """The learned tiny target's cache, 16 training conversations: long enough to overfit."""
    shards = scenes.write_task_shards(tmp_path / "shards", "train", 24, samples_per_shard=16)
    cfg = extract_config(tmp_path / "cache", shards, COMMITTED_TARGET / "model", layer_ids=LAYER_IDS)
    cfg.generation.max_new_tokens = 64
    cfg.generation.batch_size = 16
    extract(cfg)
    recipe = ("optim.max_steps=100", "optim.lr=3e-3", "optim.warmup_steps=5", "eval_every=10", "log_every=100",
              "eval_replay_samples=8")
    run_dir = tmp_path / "run"
    state = train(tiny(tmp_path / "cache", run_dir, *recipe, "save_every=10", "keep_last=0"))
    saved = sorted((run_dir / "checkpoints").iterdir())
    held_out = {checkpoint_step(p): evaluate_checkpoint(p, max_samples=8, out=tmp_path / "eval" / p.name,
                                                        progress=False)["dflash"]["all"]["tau"] for p in saved}
    assert sorted(held_out) == list(range(10, 101, 10))
    # What training logged is what train.evaluate replays on the same samples.
    assert {s: t for s, t in state.evaluations} == pytest.approx(held_out, abs=1e-12)
    best = evaluate_checkpoint(run_dir / "best", max_samples=8, out=tmp_path / "eval-best", progress=False)
    best_step = checkpoint_step(run_dir / "best")
    assert best["dflash"]["all"]["tau"] == max(held_out.values()) == held_out[best_step]
    assert best_step == min(s for s, t in held_out.items() if t == max(held_out.values()))
    # Measured: held-out tau peaks at step 60 (1.293) and falls to 1.254 by step 100, so the best is not the last.
    assert best_step < 100 and held_out[best_step] > held_out[100]
    # Stopping after 3 evaluations without a better tau ends where that history first has 3 after its best; the
    # best is kept apart from the one step checkpoint keep_last=1 leaves.
    history = sorted(held_out.items())
    stop = next(history[i][0] for i in range(len(history))
                if i - max(range(i + 1), key=lambda j: (history[j][1], -j)) >= 3)
    early_dir = tmp_path / "early"
    early = train(tiny(tmp_path / "cache", early_dir, *recipe, "save_every=10", "keep_last=1",
                       "early_stop_patience=3"))
    assert early.step == stop and early.best == (best_step, pytest.approx(held_out[best_step], abs=1e-12))
    assert [p.name for p in (early_dir / "checkpoints").iterdir()] == [f"step-{stop:08d}"]
    assert checkpoint_step(early_dir / "best") == best_step
    exported = export(run_dir / "best", "speculators", tmp_path / "export")
    assert json.loads((exported / "config.json").read_text())["dflash_offline"]["source_checkpoint"].endswith("best")


PUBLISHED = ["drafter.architecture=dflash", "objective.weighting=decay"]  # the published recipes are DFlash's


@pytest.mark.parametrize("setup, overrides", [
    ("qwen3_8b", [*PUBLISHED, "optim=published", "data.max_length=3072", "data.max_tokens_per_batch=12288"]),
    ("qwen3vl8b", [*PUBLISHED, "optim=published"]),
    ("qwen3vl30b", [*PUBLISHED, "optim=published", "optim.epochs=5", "drafter.block_size=8",
                    "data.caches=[{url: cache/gui, weight: 3}, {url: cache/chat, weight: 1}]", "eval_every=500",
                    "eval_replay_samples=200", "early_stop_patience=8"]),
    ("qwen35_9b", [*PUBLISHED, "optim=published", "drafter.block_size=8"]),
    ("qwen35_35b", [*PUBLISHED, "optim=published", "data.max_length=4096"])])
def test_the_readme_recipes_compose(setup, overrides):
    """The commands of the README's recipe table, as written there."""
    from train.config import validate
    from train.config import resolve_gamma

    cfg = compose_train(f"setup={setup}", *overrides, *([] if any("data.caches" in o for o in overrides)
                                                          else ["data.cache=x"]))
    validate(cfg)
    assert (cfg.optim.epochs, cfg.optim.warmup_ratio, cfg.optim.lr) == (5 if setup == "qwen3vl30b" else 6, 0.04, 6e-4)
    assert resolve_gamma(cfg.objective.gamma, cfg.drafter.block_size) == {16: 7, 8: 4}[cfg.drafter.block_size]
    assert cfg.objective.num_anchors == 512 and cfg.drafter.num_layers == 5
    assert (cfg.drafter.architecture, cfg.objective.weighting) == ("dflash", "decay")  # what was published
    if setup == "qwen3vl30b":
        assert [(c.url, c.weight, c.name) for c in cfg.data.sources()] == [("cache/gui", 3, "gui"),
                                                                           ("cache/chat", 1, "chat")]
