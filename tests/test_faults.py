"""What a cluster does to a run, produced for real: a scheduler's signal, a second job on the same directory, a
lock left by a killed process, a file-size limit (the full disk of a subprocess), a checkpoint cut short, a target
whose states are not finite. Each ends in one line, loses nothing committed, and the same command completes."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache_schema import CacheReader
from cache_schema.lock import LOCK_FILE, DirectoryLock, DirectoryLocked
from cache_schema.stop import STOPPED_EXIT
from extract.run import run as extract
from helpers import ROOT, accelerate_launch, counting_cache, extract_config, tiny
from test_extract_run import cache_contents, extract_cli
from tools.fixtures.demo_shards import write_shards
from train import checkpoint
from train.loop import train


def train_cli(cache, run_dir, *extra):
    return [sys.executable, "-m", "train", "setup=tiny", f"data.cache={cache}", f"run_dir={run_dir}",
            "optim.max_steps=40", "log_every=1", "save_every=0", "eval_every=0", "progress=false", "threads=1",
            "objective.num_anchors=16", "drafter.mask_token_id=63",
            f"hydra.run.dir={Path(run_dir).parent}/hydra-{Path(run_dir).name}", *extra]


def wait_for(predicate, proc, timeout=120.0):
    """Until `predicate()`, failing with `proc`'s output if it ended first."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"ended first (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return counting_cache(tmp_path_factory.mktemp("faults"))


def small(cache, run_dir, *overrides):
    """A short in-process run on the counting cache (its tokenizer is a stub: the mask id is given)."""
    return tiny(cache, run_dir, "drafter.mask_token_id=63", *overrides)


def test_sigterm_during_training_saves_that_step_and_the_same_command_resumes_exactly(cache, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(train_cli(cache, straight), cwd=ROOT, check=True, capture_output=True)
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen(train_cli(cache, run_dir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: logged_steps(run_dir) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED_EXIT, err[-2000:]
    step = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert 3 <= step < 40 and f"stopped by SIGTERM after step {step} of 40" in out
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == [f"step-{step:08d}"]
    assert not (run_dir / LOCK_FILE).exists()  # released on the way out
    done = subprocess.run(train_cli(cache, run_dir), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and f"resuming from {run_dir}/checkpoints/step-{step:08d}" in done.stdout
    final = [load_file(str(d / "checkpoints" / "step-00000040" / "model.safetensors")) for d in (straight, run_dir)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])  # one thread on both sides: bit for bit


def test_sigint_during_extraction_commits_nothing_half_written_and_the_rerun_completes(tmp_path, tiny_targets):
    shards = write_shards(tmp_path / "in", shards=4, samples=8, seed=5)
    target = tiny_targets / "qwen3_vl"
    extract(extract_config(tmp_path / "clean", shards, target))
    out = tmp_path / "stopped" / "cache"
    cli = extract_cli(out, shards, target, "generation.batch_size=1")
    proc = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: list(out.glob("shards/*/_COMMITTED.json")), proc)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED_EXIT, err[-2000:]
    line = next(x for x in stdout.splitlines() if x.startswith("extract: stopped by SIGINT during capture"))
    committed = CacheReader(str(out)).shards
    assert f"{len(committed)} shards are committed" in line and "the same command resumes there" in line
    assert len(committed) < 4 or "nothing" in line
    subprocess.run(cli, cwd=ROOT, check=True, capture_output=True)
    assert cache_contents(out) == cache_contents(tmp_path / "clean")


HOLDER = ("import sys; from cache_schema.lock import DirectoryLock\n"
          "with DirectoryLock(sys.argv[1], 'run_dir'):\n    print('held', flush=True); sys.stdin.read()")


def test_a_directory_held_by_a_live_process_is_refused_and_one_killed_is_taken_over(cache, tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    cfg = small(cache, run_dir, "optim.max_steps=2", "eval_every=0")
    with pytest.raises(DirectoryLocked, match=rf"run_dir='{run_dir}' is being written by another live process "
                                              rf"\(host \S+, pid {holder.pid}, since "):
        train(cfg)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    holder.kill()  # kill -9: the lock file stays behind
    holder.wait()
    assert (run_dir / LOCK_FILE).exists()
    train(cfg)
    assert "took over the lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert checkpoint.checkpoints(run_dir) and not (run_dir / LOCK_FILE).exists()


def test_an_extraction_out_held_by_a_live_process_is_refused(tmp_path, tiny_targets, demo_shards):
    out = tmp_path / "cache"
    with DirectoryLock(out, "out"):
        with pytest.raises(DirectoryLocked, match=f"out='{out}' is being written by another live process .* pid "
                                                  f"{os.getpid()}"):
            extract(extract_config(out, demo_shards[:1], tiny_targets / "qwen3"))
    assert not (out / "shards").exists()


def test_a_lock_of_another_host_is_kept_while_it_beats_and_taken_once_it_stops(tmp_path):
    """Another host's pid cannot be asked: its heartbeat (the file's age on the directory's clock) decides."""
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "taken_at": "earlier"}))
    with pytest.raises(DirectoryLocked, match="host node-elsewhere, pid 1"):
        DirectoryLock(tmp_path, "out").__enter__()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with DirectoryLock(tmp_path, "out"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def limited(limit: int):
    """preexec_fn: files of at most `limit` bytes, and EFBIG raised instead of the SIGXFSZ that would kill."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_checkpoint_that_does_not_fit_fails_in_one_line_and_the_rerun_completes(cache, tmp_path):
    run_dir = tmp_path / "run"
    cli = train_cli(cache, run_dir, "optim.max_steps=6", "save_every=3")
    full = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, preexec_fn=limited(64 << 10))
    assert full.returncode == 1
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train: checkpoint {run_dir}/checkpoints/step-00000003 could not be written: File too "
                           "large; nothing half-written is visible")
    assert not checkpoint.checkpoints(run_dir) and not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert not (run_dir / LOCK_FILE).exists()
    subprocess.run(cli, cwd=ROOT, check=True, capture_output=True)
    assert [p.name for p in checkpoint.checkpoints(run_dir)] == ["step-00000003", "step-00000006"]


def test_a_shard_that_does_not_fit_is_not_committed_and_the_rerun_completes(tmp_path, tiny_targets, demo_shards):
    out = tmp_path / "cache"
    target = tiny_targets / "qwen3_vl"
    cli = extract_cli(out, demo_shards[:2], target)
    subprocess.run(extract_cli(out, demo_shards[:1], target), cwd=ROOT, check=True, capture_output=True)
    first = cache_contents(out)
    full = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, preexec_fn=limited(24 << 10))
    assert full.returncode == 1
    assert full.stderr.strip().splitlines()[-1].startswith(f"extract: output shard {out}/shards/")
    assert "could not be written: File too large" in full.stderr
    assert cache_contents(out) == first  # the committed shard as it was, the cut one invisible
    subprocess.run(cli, cwd=ROOT, check=True, capture_output=True)
    assert len(CacheReader(str(out)).shards) == 2 and not CacheReader(str(out)).uncommitted


def test_an_export_that_does_not_fit_leaves_out_as_it_was(cache, tmp_path):
    run_dir = tmp_path / "run"
    train(small(cache, run_dir, "optim.max_steps=2", "eval_every=0"))
    cmd = [sys.executable, "-m", "train.export", str(run_dir), "--format", "speculators", "--out",
           str(tmp_path / "export"), "--dtype", "float32"]
    full = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=limited(32 << 10))
    assert full.returncode == 1 and "Traceback" not in full.stderr
    assert full.stderr.strip() == (f"train.export: export {tmp_path}/export could not be written: File too large; "
                                   "nothing half-written is visible and nothing committed was lost: free space and run "
                                   "the same command again")
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export.*"))
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)


def test_a_cut_checkpoint_is_passed_over_by_resume_and_refused_by_its_readers(cache, tmp_path, caplog):
    from tools.spec_decode import run as spec_decode
    from train.evaluate import main as evaluate_main
    from train.export import export

    run_dir = tmp_path / "run"
    train(small(cache, run_dir, "optim.max_steps=8", "save_every=4", "eval_every=0"))
    newest = run_dir / "checkpoints" / "step-00000008"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a node that died mid-write, without atomic rename
    assert checkpoint.find_resume(run_dir, "auto").name == "step-00000004"
    assert f"passing over checkpoint {newest}" in caplog.text and "bytes where its header declares" in caplog.text
    message = rf"checkpoint {newest} is damaged: model.safetensors: \d+ bytes where its header declares \d+"
    with pytest.raises(ValueError, match=message):
        export(newest, "speculators", tmp_path / "export")
    with pytest.raises(ValueError, match=message):
        spec_decode("unused-target", newest, shards="unused", progress=False)
    with pytest.raises(ValueError, match=message):  # `python -m train.evaluate` prints it as its one line
        evaluate_main([str(newest)])
    optim = run_dir / "checkpoints" / "step-00000004" / "optim.pt"
    optim.write_bytes(optim.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"no checkpoint of .* loads: step-00000008 \(model.safetensors: .*\); "
                                         r"step-00000004 \(optim.pt is not a whole torch checkpoint"):
        checkpoint.find_resume(run_dir, "auto")  # neither loads: nothing is pruned by a silent fresh start


def test_training_stops_after_consecutive_non_finite_steps(cache, tmp_path):
    """An absurd learning rate makes every gradient overflow: the run stops in one line, not with exit 0."""
    cfg = small(cache, tmp_path / "run", "optim.max_steps=30", "optim.lr=1e30", "optim.warmup_steps=0",
               "nonfinite_patience=3", "eval_every=0")
    with pytest.raises(ValueError, match=r"3 optimizer steps in a row \(up to step \d+\) had a non-finite gradient"):
        train(cfg)


def test_non_finite_hidden_states_are_a_counted_skip_and_mostly_non_finite_stops(tmp_path, tiny_targets,
                                                                                  demo_shards):
    """A real target whose middle layers overflow: a layer's weights scaled to inf on some inputs."""
    import shutil

    from safetensors.torch import save_file

    target = tmp_path / "target"
    shutil.copytree(tiny_targets / "qwen3", target)
    weights = load_file(str(target / "model.safetensors"))
    name = next(k for k in weights if k.endswith("layers.3.mlp.down_proj.weight"))
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match=r"of the \d+ samples captured so far had inf or NaN hidden states"):
        extract(extract_config(tmp_path / "cache", demo_shards, target))
    assert not CacheReader(str(tmp_path / "cache")).shards


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(cache, tmp_path):
    """Two processes under `accelerate launch`; SIGTERM reaches only rank 1 (a scheduler's signal need not reach
    all of them at once): both stop after the same step, whose checkpoint is complete, and the rerun resumes."""
    run_dir = tmp_path / "run"
    cmd = [*accelerate_launch(), "-m", "train", "setup=tiny",
           f"data.cache={cache}", f"run_dir={run_dir}", "optim.max_steps=200", "log_every=1", "save_every=0",
           "eval_every=0", "progress=false", "objective.num_anchors=16", "drafter.mask_token_id=63",
           "data.max_tokens_per_batch=256", f"hydra.run.dir={tmp_path}/hydra"]
    token = f"FAULT_TEST={uuid.uuid4().hex}".encode()  # inherited by the launcher's workers: how we find them
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "FAULT_TEST": token.decode().split("=")[1]})
    try:
        wait_for(lambda: logged_steps(run_dir) >= 2, proc)
        ranks = {}
        for entry in Path("/proc").iterdir():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((e.split(b"=")[1] for e in environ if e.startswith(b"RANK=")), None)
            if token in environ and rank is not None:
                ranks[int(rank)] = int(entry.name)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = checkpoint.checkpoints(run_dir)
    step = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert [p.name for p in saved] == [f"step-{step:08d}"] and step < 200, err[-2000:]
    assert "stopped by another rank" in out and "stopped by SIGTERM" in out  # rank 0 followed rank 1
    done = subprocess.run(cmd[:-1] + ["optim.max_steps=" + str(step + 2), f"hydra.run.dir={tmp_path}/hydra2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in checkpoint.checkpoints(run_dir)][-1] == f"step-{step + 2:08d}"
