"""The extract loop end to end: resume after SIGKILL, two processes, bad input, converters, configs."""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from cache_schema import CacheReader
from cache_schema.codecs import bf16_to_words
from extract.config import ExtractConfig
from extract.formats import Conversation
from extract.batching import length_sorted_batches, text_length
from extract.run import run
from extract.target import check_layer_ids, default_layer_ids
from helpers import accelerate_launch
from helpers import extract_config as config
from tools.fixtures.demo_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]


def cache_contents(url) -> dict:
    """Everything a training run could read, keyed by (shard, sample key)."""
    reader = CacheReader(url)
    out = {}
    for i in range(len(reader)):
        shard, _ = reader.locate(i)
        s = reader[i]
        out[shard, s.key] = (s.input_ids.tobytes(), s.loss_mask.tobytes(), s.position_ids.tobytes(),
                             bf16_to_words(s.hidden_TLH).tobytes())
    return out


def extract_cli(out, shards, target_dir, *extra):
    return [sys.executable, "-m", "extract", f"out={out}", f"data.shards='{','.join(map(str, shards))}'",
            f"target.path={target_dir}", "target.dtype=float32", "target.device=cpu", "generation.max_new_tokens=16",
            "generation.batch_size=4", "progress=false", "hydra.run.dir=" + str(Path(out).parent / "hydra"), *extra]


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("four"), shards=4, samples=12, seed=3)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_targets, four_shards):
    target = tiny_targets / "qwen3_vl"
    run(config(tmp_path / "clean", four_shards, target))
    killed = tmp_path / "killed" / "cache"
    proc = subprocess.Popen(extract_cli(killed, four_shards, target), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(killed.glob("shards/*/_COMMITTED.json")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Where the kill lands (mid-shard, between shards, after the last one on a slow machine) is the machine's to
    # decide; what is promised is that the rerun then ends with what an uninterrupted run writes.
    assert len(CacheReader(str(killed)).shards) >= 1
    subprocess.run(extract_cli(killed, four_shards, target), cwd=ROOT, check=True, capture_output=True)
    assert cache_contents(killed) == cache_contents(tmp_path / "clean")
    assert not CacheReader(str(killed)).uncommitted


def test_accelerate_two_processes_equal_one(tmp_path, tiny_targets, four_shards):
    """Byte-identical whatever the machine's core count: both runs pin the same intra-op thread count."""
    target = tiny_targets / "qwen3_vl"
    threads = torch.get_num_threads()
    try:
        run(config(tmp_path / "one", four_shards, target, threads=1))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two" / "cache"
    cmd = [*accelerate_launch(), "-m", "extract"]
    result = subprocess.run(cmd + extract_cli(two, four_shards, target, "threads=1")[3:], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cache_contents(two) == cache_contents(tmp_path / "one")
    markers = [json.loads(m.read_text()) for m in two.glob("shards/*/_COMMITTED.json")]
    assert len(markers) == 4 and json.loads((two / "summary.json").read_text())["shards"] == 4  # rank 0 summed both


def _image_bytes(mode: str, fmt: str) -> bytes:
    img = Image.new("RGB", (48, 40), (200, 30, 90)).convert(mode) if mode != "P" else \
        Image.new("RGB", (48, 40), (20, 130, 90)).convert("P", palette=Image.ADAPTIVE)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _record(key, turns, images=None, names=None):
    rec = {"__key__": key, "json": json.dumps({"conversations": turns, "images": names or list(images or {})})}
    rec.update(images or {})
    return rec


ASK = [{"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "A red square."}]


def bad_shard(path: Path) -> Path:
    good = _image_bytes("RGB", "PNG")
    records = [
        _record("good_rgb", ASK, {"0.png": good}),
        _record("good_rgba", ASK, {"0.png": _image_bytes("RGBA", "PNG")}),
        _record("good_gray", ASK, {"0.png": _image_bytes("L", "PNG")}),
        _record("good_palette", ASK, {"0.png": _image_bytes("P", "PNG")}),
        _record("good_cmyk", ASK, {"0.jpg": _image_bytes("CMYK", "JPEG")}),
        _record("good_webp", ASK, {"0.webp": _image_bytes("RGB", "WEBP")}),
        _record("good_text", [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]),
        _record("bad_corrupt", ASK, {"0.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"}),
        _record("bad_missing", ASK, {}, names=["0.png"]),
        _record("bad_too_many_tags", [{"from": "human", "value": "<image><image> two?"}, ASK[1]], {"0.png": good}),
        {"__key__": "bad_json", "json": b"{not json"},
        {"__key__": "bad_format", "json": json.dumps({"question": "x", "answer": "y"})},
        _record("bad_no_assistant", [{"from": "human", "value": "Anyone?"}]),
        _record("bad_long", [{"from": "human", "value": "red " * 400}, {"from": "gpt", "value": "ok"}]),
    ]
    with wds.TarWriter(str(path)) as sink:
        for r in records:
            sink.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in r.items()})
    return path


EXPECTED_SKIPS = {"corrupt_image": 1, "missing_image": 1, "image_count_mismatch": 1, "invalid_json": 1,
                  "unknown_format": 1, "no_assistant_turn": 1, "too_long": 1}


def test_bad_input_is_skipped_and_counted(tmp_path, tiny_targets, capsys):
    shard = bad_shard(tmp_path / "bad-000000.tar")
    summary = run(config(tmp_path / "cache", [shard], tiny_targets / "qwen3_vl", max_length=256))
    assert summary["skipped"] == EXPECTED_SKIPS
    reader = CacheReader(str(tmp_path / "cache"))
    assert sorted(reader[i].key for i in range(len(reader))) == sorted(
        ["good_rgb", "good_rgba", "good_gray", "good_palette", "good_cmyk", "good_webp", "good_text"])
    assert reader.markers[reader.shards[0]]["skipped"] == EXPECTED_SKIPS
    assert json.loads((tmp_path / "cache" / "summary.json").read_text())["skipped"] == EXPECTED_SKIPS
    out = capsys.readouterr().out
    assert "skipped.corrupt_image: 1" in out and "samples: 7" in out


def test_strict_stops_at_first_bad_sample_and_keeps_committed_shards(tmp_path, tiny_targets, demo_shards):
    cache = tmp_path / "cache"
    run(config(cache, demo_shards[:1], tiny_targets / "qwen3_vl"))
    committed = sorted(p for p in (cache / "shards").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in committed}
    shard = bad_shard(tmp_path / "bad-000000.tar")
    with pytest.raises(ValueError, match="sample bad_corrupt: corrupt_image"):
        run(config(cache, [demo_shards[0], shard], tiny_targets / "qwen3_vl", strict=True))
    assert {p: p.read_bytes() for p in committed} == before
    assert len(CacheReader(str(cache)).shards) == 1


def test_cache_from_another_target_is_refused_before_work(tmp_path, tiny_targets, demo_shards):
    cache = tmp_path / "cache"
    run(config(cache, demo_shards[:1], tiny_targets / "qwen3_vl"))
    with pytest.raises(ValueError, match="target.fingerprint"):
        run(config(cache, demo_shards[:1], tiny_targets / "qwen3_vl_moe"))


def test_converters_json_and_datasets(tmp_path, tiny_targets):
    import datasets

    from extract.convert import convert_hf, convert_json

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_image_bytes("RGB", "PNG"))
    (images / "b.jpg").write_bytes(_image_bytes("RGB", "JPEG"))
    rows = [{"id": "one", "image": "a.png", "conversations": ASK},
            {"id": "two", "image": ["a.png", "b.jpg"], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Alike."}]},
            {"id": "three", "conversations": [{"from": "human", "value": "Text?"}, {"from": "gpt", "value": "Yes."}]},
            {"id": "gone", "image": "nope.png", "conversations": ASK}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert convert_json(tmp_path / "data.jsonl", images, tmp_path / "wds_json", per_shard=3) == {"written": 4}
    ds = datasets.Dataset.from_list([{"id": "hf1", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]}],
        "images": [Image.open(images / "a.png")]}])
    assert convert_hf(ds, tmp_path / "wds_hf") == {"written": 1}
    shards = sorted((tmp_path / "wds_json").glob("*.tar")) + sorted((tmp_path / "wds_hf").glob("*.tar"))
    assert len(shards) == 3
    summary = run(config(tmp_path / "cache", shards, tiny_targets / "qwen3_vl"))
    assert summary["samples"] == 4 and summary["skipped"] == {"missing_image": 1}
    reader = CacheReader(str(tmp_path / "cache"))
    images = {reader[i].key: reader[i].meta["num_images"] for i in range(4)}
    assert images == {"one": 1, "two": 2, "three": 0, "hf1": 1}


# Published decoder depth and deepstack layer count of each named target (tiny and learned are ours).
TARGET_SHAPES = {"qwen3vl8b": (36, 3), "qwen3vl30b": (48, 3), "qwen35_9b": (32, 0), "qwen35_35b": (40, 0),
                 "qwen36_35b": (40, 0), "qwen3_8b": (36, 0), "tiny": (8, 2), "learned": (6, 2),
                 "learned_qwen35": (8, 0)}


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "target").glob("*.yaml")))
def test_every_target_config_composes_with_the_documented_layer_ids(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("extract", overrides=[f"target={name}", "out=x", "data.shards=y"])
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ExtractConfig) and obj.target.path and obj.target.model_type
    layers, deepstack = TARGET_SHAPES[name]
    n = len(obj.target.layer_ids)
    # docs/design.md's rule: spread from the first layer after the deepstack ones to L-3, never the last layer.
    rule = default_layer_ids(layers, n, start=max(1, deepstack))
    if len(set(rule)) == n:
        assert obj.target.layer_ids == rule
    else:  # too few layers for n distinct ids up to L-3: explicit ids, still past the deepstack and below the last
        ids = obj.target.layer_ids
        assert ids == sorted(set(ids)) and ids[0] >= max(1, deepstack) and ids[-1] < layers - 1, ids
    check_layer_ids(obj.target.layer_ids, layers, deepstack)


def test_wrong_config_key_is_refused():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="generation.max_new_token"):
            compose("extract", overrides=["generation.max_new_token=3"])


def test_invalid_layer_ids_are_refused_before_loading(tmp_path, tiny_targets, demo_shards):
    cfg = config(tmp_path / "cache", demo_shards[:1], tiny_targets / "qwen3_vl")
    cfg.target.layer_ids = [2, 7]
    with pytest.raises(ValueError, match="last layer"):
        run(cfg)
    assert not (tmp_path / "cache").exists()


def test_a_default_spread_with_repeated_ids_is_refused_by_its_cause(tmp_path, tiny_targets, demo_shards):
    cfg = config(tmp_path / "cache", demo_shards[:1], tiny_targets / "qwen3_vl")  # 8 layers, deepstack 0..1
    cfg.target.layer_ids, cfg.target.num_capture_layers = None, 5  # layers 2..5 hold only four ids
    with pytest.raises(ValueError, match=r"num_capture_layers=5: .* 8-layer target has no 5 distinct ids"):
        run(cfg)
    assert not (tmp_path / "cache").exists()


def test_supervise_history_off_keeps_only_the_last_turn_and_turn_counts_reach_the_summary(tmp_path, tiny_targets,
                                                                                          demo_shards):
    def run_with(out, supervise_history):
        cfg = config(out, demo_shards[:1], tiny_targets / "qwen3_vl")
        cfg.generation.supervise_history = supervise_history
        return run(cfg), CacheReader(str(out))

    summary, both = run_with(tmp_path / "all", True)
    _, last = run_with(tmp_path / "last", False)
    assert last.manifest.generation["supervise_history"] is False
    multi = 0
    for i in range(len(both)):
        a, b = both[i], last[i]
        assert a.input_ids.tolist() == b.input_ids.tolist()
        spans = np.flatnonzero(np.diff(np.concatenate([[0], a.loss_mask.astype(int), [0]])) == 1)
        # the last-turn-only mask is the full mask's last span, nothing else
        assert b.loss_mask.sum() and b.loss_mask[:spans[-1]].sum() == 0
        assert b.loss_mask[spans[-1]:].tolist() == a.loss_mask[spans[-1]:].tolist()
        multi += len(spans) > 1
    assert multi  # the shard has multi-turn samples whose history lost its supervision
    cut = sum(both[i].meta["truncated_turns"] for i in range(len(both)))
    assert summary["turns"].get("truncated", 0) == cut


def test_length_sorted_batches_reorder_only_within_each_window():
    lengths = [50, 3, 17, 80, 1, 64, 9, 33, 70, 2, 45, 12, 5, 90]
    convs = [Conversation(key=f"c{i}", source="t", messages=[
        {"role": "user", "content": [{"type": "text", "text": "q" * n}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) for i, n in enumerate(lengths)]
    batches = list(length_sorted_batches(iter(convs), batch_size=3, window=2))
    assert [len(b) for b in batches] == [3, 3, 3, 3, 2]
    flat = [c for b in batches for c in b]
    assert sorted(c.key for c in flat) == sorted(c.key for c in convs)
    for w in range(0, len(convs), 6):  # each window of 2 batches holds the same conversations, sorted by length
        window = flat[w:w + 6]
        assert {c.key for c in window} == {c.key for c in convs[w:w + 6]}
        assert [text_length(c) for c in window] == sorted(text_length(c) for c in window)
    assert [c.key for b in length_sorted_batches(iter(convs), 3, 1) for c in b] == [c.key for c in convs]


def test_a_window_is_cut_where_its_decoded_images_reach_the_pixel_budget():
    """Memory follows the budget, not what the images declare: a window of 2 x 3 conversations is cut at the
    conversation whose images bring it to the budget, and the rest come in order after it."""
    sizes = [(10, 10), (100, 50), (10, 10), (10, 10), (70, 70), (10, 10), (10, 10), (10, 10)]
    convs = [Conversation(key=f"c{i}", source="t", images=[Image.new("RGB", s)], messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q" * (9 - i)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]) for i, s in enumerate(sizes)]
    batches = list(length_sorted_batches(iter(convs), batch_size=3, window=2, max_pixels=5000))
    assert [sorted(c.key for c in b) for b in batches] == [["c0", "c1"], ["c2", "c3", "c4"], ["c5", "c6", "c7"]]
