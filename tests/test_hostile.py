"""Hostile input, one test per class: a bad sample between good ones is a counted skip and the good ones land;
images reach the model as the serving loaders give them; data never runs code; memory does not follow what the
data declares; refusals come early and in one line."""

import io
import json
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from transformers.image_utils import load_image

from cache_schema import CacheReader
from extract import sources
from extract.formats import MAX_IMAGE_BYTES, SkipSample, decode_image, decoded_bytes, parse_sample, to_rgb
from extract.run import run
from helpers import extract_config, tiny

ROOT = Path(__file__).resolve().parents[1]
ASK = [{"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "A red square."}]
TEXT = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]


def png(width=48, height=40, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def record(key, meta, **members) -> dict:
    return {"__key__": key, "json": json.dumps(meta).encode() if isinstance(meta, dict) else meta, **members}


# key -> (record, the reason it is skipped with)
BAD = {
    "thin_image": (record("thin_image", {"conversations": ASK, "images": ["0.png"]}, **{"0.png": png(2000, 4)}),
                   "unprocessable"),  # the processor refuses an aspect ratio above 200
    "deep_json": (record("deep_json", b"[" * 200_000 + b"]" * 200_000), "invalid_json"),
    "images_a_number": (record("images_a_number", {"conversations": ASK, "images": 3}), "unknown_format"),
    "images_numbers": (record("images_numbers", {"conversations": ASK, "images": [1, 2]}), "unknown_format"),
    "value_object": (record("value_object", {"conversations": [TEXT[0], {"from": "gpt", "value": {"text": "x"}}]}),
                     "unknown_format"),
    "value_missing": (record("value_missing", {"conversations": [TEXT[0], {"from": "gpt", "value": None}]}),
                      "unknown_format"),
    "lone_surrogate": (record("lone_surrogate", b'{"conversations": [{"from": "human", "value": "x\\ud800"}, '
                              b'{"from": "gpt", "value": "y"}]}'), "unprocessable"),  # the tokenizer refuses it
    "huge_text": (record("huge_text", {"conversations": [{"from": "human", "value": "red " * 2_000_000},
                                                          TEXT[1]]}), "too_long"),
    "big_member": (record("big_member", {"conversations": ASK, "images": ["0.png"]}, **{"0.png": b"x" * (9 << 20)}),
                   "member_too_large"),
    "bad/../key": (record("bad/../key", {"conversations": TEXT}), "bad_key"),
}


def write_tar(path: Path, records: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for r in records:
            sink.write(r)
    return path


def test_one_bad_sample_never_ends_the_run_and_the_good_ones_land(tmp_path, tiny_targets, monkeypatch):
    """Each bad sample between two good ones, in one shard, batched together: the good ones are all cached."""
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 8 << 20)  # the big member is larger, the huge text smaller
    records, good = [], []
    for i, (key, (bad, _)) in enumerate(BAD.items()):
        good += [f"good{i}a", f"good{i}b"]
        records += [record(good[-2], {"conversations": ASK, "images": ["0.png"]}, **{"0.png": png()}), bad,
                    record(good[-1], {"conversations": TEXT})]
    shard = write_tar(tmp_path / "hostile-000000.tar", records)
    cfg = extract_config(tmp_path / "cache", [shard], tiny_targets / "qwen3_vl", max_length=512)
    cfg.generation.batch_size = 6  # every bad sample shares a batch with good ones
    summary = run(cfg)
    expected = {}
    for _, reason in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert summary["skipped"] == expected
    reader = CacheReader(str(tmp_path / "cache"))
    assert sorted(reader[i].key for i in range(len(reader))) == sorted(good)


def test_strict_still_stops_at_the_first_bad_sample(tmp_path, tiny_targets):
    bad, reason = BAD["images_a_number"]
    shard = write_tar(tmp_path / "strict-000000.tar", [record("ok", {"conversations": TEXT}), bad])
    with pytest.raises(ValueError, match=f"sample images_a_number: {reason}"):
        run(extract_config(tmp_path / "cache", [shard], tiny_targets / "qwen3_vl", strict=True))
    assert not CacheReader(str(tmp_path / "cache")).shards


def served(img: Image.Image) -> np.ndarray:
    """What transformers' load_image gives the processor (EXIF orientation, then PIL's convert), except that
    transparency is composited on white, as vLLM's loader does (load_image would keep the hidden colours);
    tests/test_vllm.py compares with vLLM's own loader."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        white = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        white.paste(rgba, mask=rgba.split()[3])
        return np.asarray(white)
    return np.asarray(load_image(img))


def image_cases():
    gradient = np.linspace(0, 65535, 48 * 40, dtype=np.uint16).reshape(40, 48)
    rgb = Image.new("RGB", (48, 40), (200, 30, 90))
    rgba = Image.new("RGBA", (48, 40), (200, 30, 90, 0))
    rgba.paste((10, 200, 10, 255), (0, 0, 24, 40))
    palette = Image.new("RGB", (48, 40), (20, 130, 90)).convert("P", palette=Image.ADAPTIVE)
    palette.info["transparency"] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    return {"rgb": (rgb, "PNG", {}), "rgba": (rgba, "PNG", {}), "la": (rgba.convert("LA"), "PNG", {}),
            "gray": (rgb.convert("L"), "PNG", {}), "palette_transparent": (palette, "PNG", {}),
            "cmyk": (rgb.convert("CMYK"), "JPEG", {}), "16bit": (Image.fromarray(gradient), "PNG", {}),
            "exif_rotated": (Image.new("RGB", (48, 40), (250, 250, 0)), "JPEG", {"exif": exif.tobytes()})}


@pytest.mark.parametrize("name", list(image_cases()))
def test_images_reach_the_model_as_the_serving_loaders_give_them(name):
    img, fmt, save = image_cases()[name]
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    ours = decode_image(buf.getvalue(), f"0.{fmt.lower()}")
    theirs = served(Image.open(io.BytesIO(buf.getvalue())))
    assert ours.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours), theirs)
    if name == "exif_rotated":
        assert ours.size == (40, 48)  # turned upright, as the loaders show it


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_float_and_32_bit_modes_convert_as_the_loaders_do(dtype):
    img = Image.fromarray(np.linspace(0, 300, 48 * 40).astype(dtype).reshape(40, 48))
    assert img.mode in ("F", "I")
    np.testing.assert_array_equal(np.asarray(to_rgb(img)), np.asarray(load_image(img)))


def test_an_image_costing_too_much_memory_is_skipped_before_it_is_decoded():
    side = 10_000  # 100M pixels of one bit: 12 KB on disk, 400 MB decoded to RGB
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    with pytest.raises(SkipSample, match=f"image_too_large: 0.png: {side}x{side} 1 would take 381 MiB"):
        decode_image(buf.getvalue(), "0.png", max_bytes=256 << 20)


def test_a_large_scan_within_the_memory_bound_is_decoded():
    """An 8000 x 8000 poster (64M pixels, 192 MB decoded) is kept; a pixel count alone refused it before."""
    buf = io.BytesIO()
    Image.new("RGB", (8000, 8000), (200, 10, 10)).save(buf, format="PNG")
    assert decoded_bytes(Image.open(io.BytesIO(buf.getvalue()))) == 8000 * 8000 * 3 <= MAX_IMAGE_BYTES
    img = decode_image(buf.getvalue(), "poster.png")
    assert img.size == (8000, 8000) and img.getpixel((4000, 4000)) == (200, 10, 10)


def test_members_of_unused_suffixes_are_not_read_and_a_compressed_bomb_stays_small(tmp_path):
    """A gzip'd tar whose unused member inflates to 320 MB: the reader passes it over; peak memory of a process
    reading the shard stays far below it."""
    path = tmp_path / "bomb-000000.tar.gz"
    zeros = b"\0" * (1 << 20)
    with tarfile.open(path, "w:gz") as tar:
        meta = json.dumps({"conversations": TEXT}).encode()
        info = tarfile.TarInfo("a.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        info = tarfile.TarInfo("a.bin")
        info.size = 320 << 20

        class Zeros(io.RawIOBase):
            left = info.size

            def readable(self):
                return True

            def readinto(self, b):
                n = min(len(b), self.left, len(zeros))
                b[:n] = zeros[:n]
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros()))
    # VmHWM, not ru_maxrss: the latter keeps the forking test process's peak across exec.
    child = textwrap.dedent(f"""
        import re, sys
        sys.path.insert(0, {str(ROOT)!r})
        from extract.sources import tar_records

        def mb(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

        before = mb("VmRSS")
        keys = [(r["__key__"], sorted(k for k in r if not k.startswith("__"))) for r in tar_records({str(path)!r}, None)]
        print(keys, "|", mb("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=True)
    keys, grew_mb = out.stdout.split(" | ")
    assert keys == "[('a', ['json'])]"
    # Measured: about 30 MB (the decompressor's buffers) past the imports, against 320 MB inflated.
    assert int(grew_mb) < 150, f"peak memory grew {grew_mb} MB while reading past a 320 MB member"


def test_a_key_that_is_not_plain_text_is_skipped(tmp_path):
    seen = []
    shard = write_tar(tmp_path / "keys-000000.tar", [record("ok", {"conversations": TEXT}),
                                                       record("../up", {"conversations": TEXT}),
                                                       record("tab\tkey", {"conversations": TEXT})])
    keys = [r["__key__"] for r in sources.tar_records(str(shard), lambda k, s: seen.append(s.reason))]
    assert keys == ["ok"] and seen == ["bad_key", "bad_key"]


def test_parse_refuses_a_text_part_that_is_not_a_string():
    meta = {"messages": [{"role": "user", "content": [{"type": "text", "text": ["x"]}]},
                         {"role": "assistant", "content": "y"}]}
    with pytest.raises(SkipSample, match="unknown_format"):
        parse_sample(record("k", meta), "test")


class Payload:
    """Unpickling this writes a marker file: what a poisoned optim.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path, train_cache):
    from train.loop import train

    run_dir = tmp_path / "run"
    train(tiny(train_cache, run_dir, "optim.max_steps=4", "save_every=0", "eval_every=0"))
    ckpt = run_dir / "checkpoints" / "step-00000004"
    marker = tmp_path / "marker"
    (ckpt / "optim.pt").write_bytes(pickle.dumps({"optimizer": Payload(marker), "scheduler": {}}))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="optim.pt.*refused"):
        train(tiny(train_cache, run_dir, "optim.max_steps=8", "save_every=0", "eval_every=0"))
    assert not marker.exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_an_unusable_run_directory_is_refused_before_the_cache_is_read(tmp_path):
    from train.loop import train

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="run_dir"):
        train(tiny(tmp_path / "no-such-cache", tmp_path / "a-file" / "run"))


def test_the_commands_print_one_line_not_a_traceback(tmp_path):
    for cmd in ([sys.executable, "-m", "train", "setup=tiny", f"data.cache={tmp_path / 'nothing'}",
                 f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'h1'}"],
                [sys.executable, "-m", "extract", f"out={tmp_path / 'c'}", f"data.shards={tmp_path / 'none.tar'}",
                 f"hydra.run.dir={tmp_path / 'h2'}"]):
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory, tiny_targets, demo_shards):
    out = tmp_path_factory.mktemp("hostile_train") / "cache"
    run(extract_config(out, demo_shards, tiny_targets / "qwen3_vl"))
    return out


@pytest.mark.parametrize("item, message", [
    ({"messages": ["a string, not a turn"]}, "each of messages must be an object, got str"),
    ({"conversations": [{"from": "human", "value": "hi"}], "images": {"a": 1}}, "images must be a file name or"),
    ({"conversations": [{"from": "human", "value": "hi"}], "images": [3]}, "images must be a file name or"),
    ({"conversations": [{"from": "human", "value": "hi"}], "key": ["x"]}, "key must be a string or a number"),
])
def test_a_prompts_file_of_the_wrong_types_is_refused_in_one_line(tmp_path, item, message):
    from tools.spec_decode import file_conversations

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([item]))
    with pytest.raises(ValueError, match=f"{path}: sample 0: {message}") as e:
        list(file_conversations(path))
    assert "\n" not in str(e.value)


def test_a_checkpoint_config_declaring_a_huge_drafter_is_refused_from_the_weights_header(tmp_path):
    """100000 layers in config.json over weights of 2: refused before anything is allocated (2.4 GB before)."""
    from test_export import make_run
    from train.export import export

    ckpt, *_ = make_run(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["drafter"]["num_layers"] = 100_000
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the config declares 100000 layers, the weights hold 2"):
        export(ckpt, "speculators", tmp_path / "out")
    config["drafter"].update(num_layers=2, intermediate_size=10**9)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj.weight: the config declares \[32, 1000000000\], the "
                                         r"weights hold \[32, 48\]"):
        export(ckpt, "speculators", tmp_path / "out")
    assert not (tmp_path / "out").exists()
