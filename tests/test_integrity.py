"""Nothing lost, nothing silently wrong: damaged caches, broken input tars and mistaken settings, on real files.

Each test damages one thing and asserts the exact outcome: the error names the shard, array, file or key, or
the problem is counted by its reason while everything else is kept.
"""

import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import extract.run as extract_run
from cache_schema import CacheCorruptionError, CacheReader, CacheWriter, IncompatibleCacheError, verify
from cache_schema.codecs import bf16_to_words
from cache_schema.storage import Location
from extract.formats import SkipSample, parse_sample
from extract.sources import IncompleteShard, expand_shards, output_shard_name, tar_records
from helpers import extract_config, make_manifest, make_sample, write_target_files
from tools.inspect_cache import main as inspect_main

# --- the cache ------------------------------------------------------------------------------------------------


def write_cache(url, tmp_path, shards=3, per_shard=3, keys=None):
    """`shards` committed shards of `per_shard` samples (the first of each wholly unsupervised), target files
    and summary.json, as an extraction leaves them."""
    manifest = make_manifest(chunk_tokens=64)
    writer = CacheWriter(url, manifest)
    write_target_files(writer, tmp_path)
    samples = []
    for s in range(shards):
        shard = writer.shard(f"shard-{s:03d}")
        for i in range(per_shard):
            key = keys[s * per_shard + i] if keys else f"s{s}-{i}"
            sample = make_sample(key, 150 + 10 * i, manifest, seed=10 * s + i)
            if i == 0:
                sample.loss_mask[:] = False  # all-zero loss-mask chunks: legitimate, and must still be stored
            shard.add(sample)
            samples.append(sample)
        shard.commit({"source": f"input-{s}"})
    writer.write_summary({})
    return samples


def chunk_file(url, shard, array, index=1):
    loc = Location(url)
    return next(p for p in loc.fs.find(loc.path("shards", shard, array)) if p.endswith(f"/c/{index}")
                or f"/c/{index}/" in p)


@pytest.mark.parametrize("array", ["hidden", "loss_mask", "offsets"])
def test_deleted_chunk_fails_verify_and_reads_naming_shard_and_array(tmp_path, array):
    url = str(tmp_path / "cache")
    samples = write_cache(url, tmp_path)
    assert verify(url, progress=False)["ok"]  # every chunk present, the all-zero ones included
    index = 0 if array == "offsets" else 1
    Location(url).fs.rm(chunk_file(url, "shard-001", array, index))

    with pytest.raises(CacheCorruptionError, match=rf"shard shard-001, array {array}: 1 of \d+ chunk files missing"):
        verify(url, progress=False)
    reader = CacheReader(url)
    with pytest.raises(CacheCorruptionError, match=r"shard shard-001, array \w+: 1 of \d+ chunk files missing"):
        reader[3]
    for i in (0, 1, 2, 6, 7, 8):  # the other shards read back exactly
        np.testing.assert_array_equal(bf16_to_words(reader[i].hidden_TLH), bf16_to_words(samples[i].hidden_TLH))


@pytest.mark.parametrize("damage", ["array folder deleted", "zarr.json garbled"])
def test_damaged_array_metadata_is_named(tmp_path, damage):
    url = str(tmp_path / "cache")
    write_cache(url, tmp_path)
    folder = tmp_path / "cache" / "shards" / "shard-002" / "position_ids"
    shutil.rmtree(folder) if damage == "array folder deleted" else (folder / "zarr.json").write_text("{oops")
    with pytest.raises(CacheCorruptionError, match="shard shard-002, array position_ids: cannot be opened"):
        verify(url, progress=False)
    assert CacheReader(url)[0].key == "s0-0"


@pytest.mark.parametrize("name", ["target_head.safetensors", "tokenizer/vocab.json", "tokenizer/sub/merges.txt"])
def test_flipped_byte_in_a_target_file_is_named(tmp_path, name):
    url = str(tmp_path / "cache")
    write_cache(url, tmp_path, shards=1)
    path = tmp_path / "cache" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptionError, match=rf"cache/{name}: sha256 .* does not match"):
        verify(url, progress=False)
    if name == "target_head.safetensors":  # what training loads
        with pytest.raises(CacheCorruptionError, match=rf"cache/{name}: sha256"):
            CacheReader(url).head_tensors()


@pytest.mark.parametrize("what", ["directory", "marker"])
def test_deleted_shard_or_marker_is_named_against_the_summary(tmp_path, what):
    url = str(tmp_path / "cache")
    write_cache(url, tmp_path)
    victim = tmp_path / "cache" / "shards" / "shard-001"
    shutil.rmtree(victim) if what == "directory" else (victim / "_COMMITTED.json").unlink()
    with pytest.raises(CacheCorruptionError, match=r"1 shards that summary.json lists are not committed "
                                                   r"\(3 samples\): shard-001"):
        verify(url, progress=False)
    reader = CacheReader(url)
    assert reader.shards == ["shard-000", "shard-002"] and len(reader) == 6
    assert reader.describe().endswith("MISSING 1 shards with 3 samples that summary.json lists: shard-001")


def test_summary_counts_sample_keys_held_twice(tmp_path):
    url = str(tmp_path / "cache")
    write_cache(url, tmp_path, shards=2, keys=["a", "b", "c", "d", "a", "b"])
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert summary["duplicate_keys"] == 2 and summary["duplicate_key_examples"] == ["a", "b"]
    assert summary["shard_samples"] == {"shard-000": 3, "shard-001": 3} and summary["samples"] == 6


@pytest.mark.parametrize("key", ["target.hidden_size", "storage.hidden_dtype", "target_layer_ids"])
def test_manifest_missing_key_is_named_and_inspect_prints_one_line(tmp_path, capsys, key):
    url = str(tmp_path / "cache")
    write_cache(url, tmp_path, shards=1)
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    parent, _, leaf = key.rpartition(".")
    del (manifest[parent] if parent else manifest)[leaf]
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptionError, match=rf"manifest.json: key {key} is missing"):
        CacheReader(url)
    assert inspect_main([url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip().count("\n") == 0 and f"key {key} is missing" in err


def test_inspect_on_a_path_that_is_not_a_cache_prints_one_line(tmp_path, capsys):
    assert inspect_main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"inspect_cache: {tmp_path} is not a dflash-offline cache: manifest.json not found\n"


def test_a_programming_error_is_not_reported_as_corruption(tmp_path):
    url = str(tmp_path / "cache")
    write_cache(url, tmp_path, shards=1)
    reader = CacheReader(url)
    with pytest.raises(IndexError):
        reader.read("shard-000", "input_ids", (slice(None), 5))  # one axis indexed twice
    with pytest.raises(KeyError):
        reader.read("shard-000", "no_such_array")


def test_schema_1_0_cache_is_read_without_the_loss_mask_presence_check(tmp_path, caplog):
    url = str(tmp_path / "cache")
    write_cache(url, tmp_path, shards=1)
    path = tmp_path / "cache" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": "1.0"}))
    (tmp_path / "cache" / "checksums.json").unlink()
    Location(url).fs.rm(chunk_file(url, "shard-000", "loss_mask", 0))  # 1.0 did not write all-zero chunks
    reader = CacheReader(url)
    assert "schema 1.0 cache" in caplog.text
    assert not reader[0].loss_mask.any() and reader.head_tensors()["lm_head"].shape == (300, 32)
    Location(url).fs.rm(chunk_file(url, "shard-000", "hidden", 1))
    with pytest.raises(CacheCorruptionError, match="shard shard-000, array hidden: 1 of"):
        CacheReader(url)[1]


# --- input tars -----------------------------------------------------------------------------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def text_sample(key: str) -> list[tuple[str, bytes]]:
    turns = [{"from": "human", "value": f"Question {key}?"}, {"from": "gpt", "value": f"Answer {key}."}]
    return [(f"{key}.json", json.dumps({"conversations": turns}).encode())]


def read_all(url):
    skips, seen = Counter(), []
    def on_skip(key, skip):
        skips[skip.reason] += 1
        seen.append((key, skip.reason))

    records = [r["__key__"] for r in tar_records(url, on_skip)]
    return records, skips, seen


def test_repeated_member_name_skips_that_sample_only(tmp_path):
    members = text_sample("a") + text_sample("b") + text_sample("b") + text_sample("c")
    records, skips, seen = read_all(str(write_tar(tmp_path / "dup.tar", members)))
    assert records == ["a", "c"] and skips == {"duplicate_member": 1} and seen == [("b", "duplicate_member")]


def member_ends(path: Path) -> list[int]:
    """Byte offset just past each member's (padded) data."""
    with tarfile.open(path) as tar:
        return [m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers()]


@pytest.mark.parametrize("cut, reason, read", [("boundary", "truncated", "a"), ("header", "truncated", "a"),
                                               ("data", "unreadable", "a"), ("one_zero_block_left", None, "abcd")])
def test_tar_cut_short_is_an_incomplete_shard(tmp_path, cut, reason, read):
    """Records come out as they complete; the shard's end decides whether any of it may be committed."""
    full = write_tar(tmp_path / "full.tar", [m for k in "abcd" for m in text_sample(k)])
    end = member_ends(full)[1]  # after sample b
    size = {"boundary": end, "header": end + 100, "data": end + 520,
            "one_zero_block_left": member_ends(full)[-1] + 512}[cut]
    cut_tar = tmp_path / "cut.tar"
    cut_tar.write_bytes(full.read_bytes()[:size])
    if reason is None:  # nothing of the data lost: the archive reads whole
        assert read_all(str(cut_tar))[0] == list(read)
        return
    got = []
    with pytest.raises(IncompleteShard, match=rf"input shard {cut_tar}: {reason}") as e:
        for record in tar_records(str(cut_tar), None):
            got.append(record["__key__"])
    assert e.value.reason == reason and got == list(read)


def test_damaged_header_mid_tar_is_an_incomplete_shard(tmp_path):
    full = write_tar(tmp_path / "full.tar", [m for k in "abcd" for m in text_sample(k)])
    data = bytearray(full.read_bytes())
    data[member_ends(full)[1] + 148] ^= 0xFF  # the checksum field of c's header: tarfile would just stop there
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(IncompleteShard, match="truncated: no end-of-archive marker"):
        read_all(str(bad))


@pytest.mark.parametrize("command", ["cat {tar}; exit 3", "head -c 3000 {tar}", "cat {tar}.missing"])
def test_failed_pipe_is_an_incomplete_shard(tmp_path, command):
    tar = write_tar(tmp_path / "x.tar", [m for k in "abcd" for m in text_sample(k)])
    with pytest.raises(IncompleteShard) as e:
        read_all(f"pipe:{command.format(tar=tar)}")
    assert e.value.reason in ("unreadable", "truncated") and e.value.url.startswith("pipe:")


def test_fsspec_url_reads_and_a_cut_one_is_incomplete(tmp_path):
    """Schemes webdataset cannot open (s3://, memory://) go through fsspec, with the same end-of-archive check."""
    import fsspec

    whole = write_tar(tmp_path / "x.tar", [m for k in "abc" for m in text_sample(k)]).read_bytes()
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/integrity/whole.tar", whole)
    fs.pipe_file("/integrity/cut.tar", whole[:member_ends(tmp_path / "x.tar")[1]])
    assert read_all("memory://integrity/whole.tar")[0] == ["a", "b", "c"]
    with pytest.raises(IncompleteShard, match="memory://integrity/cut.tar: truncated"):
        read_all("memory://integrity/cut.tar")


def test_same_shard_listed_twice_is_one_shard(tmp_path, monkeypatch):
    write_tar(tmp_path / "a.tar", text_sample("a"))
    write_tar(tmp_path / "b.tar", text_sample("b"))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    got = expand_shards(["a.tar", "./a.tar", str(tmp_path / "a.tar"), "b.tar,{a,b}.tar", "sub/../a.tar"])
    assert got == ["a.tar", "b.tar"]
    assert output_shard_name("./a.tar") != output_shard_name("a.tar")  # hence the normalising above


ASK = [{"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "A square."}]


@pytest.mark.parametrize("meta, members, reason", [
    ({"conversations": ASK, "images": ["0.png", "1.png"]}, ["0.png", "1.png"], "image_count_mismatch"),
    ({"conversations": [{"from": "human", "value": "Hi?"}, ASK[1]]}, ["0.png"], "image_count_mismatch"),
    ({"conversations": ASK, "images": ["0.png"]}, ["0.png", "1.png"], "unreferenced_image"),
    ({"conversations": ASK, "images": ["0.png"]}, [], "missing_image"),
])
def test_image_without_placeholder_or_listing_is_counted(meta, members, reason):
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png, format="PNG")
    record = {"__key__": "k", "json": json.dumps(meta).encode(), **{m: png.getvalue() for m in members}}
    with pytest.raises(SkipSample) as e:
        parse_sample(record, source="x")
    assert e.value.reason == reason


# --- settings and extraction runs -----------------------------------------------------------------------------


def refuse_load(*args, **kwargs):
    raise AssertionError("the target was loaded")


@pytest.mark.parametrize("section, field, value, key", [
    ("data", "format", "llava2", "data.format"), ("generation", "batch_size", 0, "generation.batch_size"),
    ("generation", "sort_window", 0, "generation.sort_window"),
    ("generation", "max_length", 0, "generation.max_length"),
    ("generation", "max_new_tokens", 0, "generation.max_new_tokens"), ("target", "num_capture_layers", 0, "target.num_capture_layers"),
    ("storage", "chunk_tokens", 0, "storage.chunk_tokens"), ("storage", "compression", "lz5", "storage.compression"),
    (None, "threads", 0, "threads")])
def test_mistaken_setting_is_refused_by_key_before_anything(tmp_path, tiny_targets, demo_shards, monkeypatch,
                                                             section, field, value, key):
    monkeypatch.setattr(extract_run, "load_target", refuse_load)
    cfg = extract_config(tmp_path / "cache", demo_shards[:1], tiny_targets / "qwen3_vl")
    setattr(getattr(cfg, section) if section else cfg, field, value)
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}={value!r}"):
        extract_run.run(cfg)
    assert not (tmp_path / "cache").exists()


def test_refusals_that_need_no_model_come_before_the_target_loads(tmp_path, tiny_targets, demo_shards, monkeypatch):
    cache, target = tmp_path / "cache", tiny_targets / "qwen3_vl"
    first = extract_run.run(extract_config(cache, demo_shards[:1], target))
    monkeypatch.setattr(extract_run, "load_target", refuse_load)
    again = extract_run.run(extract_config(cache, demo_shards[:1], target))  # nothing to do: no load
    assert again["samples"] == first["samples"] == 8 and again["shards"] == 1
    with pytest.raises(IncompatibleCacheError, match=r"target\.fingerprint: cache has"):
        extract_run.run(extract_config(cache, demo_shards[:1], tiny_targets / "qwen3_vl_moe"))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"out=.*a-file/cache is not writable"):
        extract_run.run(extract_config(tmp_path / "a-file" / "cache", demo_shards[:1], target))


def test_broken_input_shards_are_counted_retried_and_the_rest_kept(tmp_path, tiny_targets, demo_shards):
    cache, target = tmp_path / "cache", tiny_targets / "qwen3_vl"
    whole = demo_shards[1].read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(whole[:member_ends(demo_shards[1])[5]])  # cut at a member boundary
    dup = write_tar(tmp_path / "dup-000000.tar", text_sample("x") + text_sample("y") + text_sample("y")
                    + text_sample("z"))
    respelled = demo_shards[0].parent / "." / demo_shards[0].name
    shards = [demo_shards[0], cut, dup, respelled]

    with pytest.raises(ValueError, match=rf"input shard {cut}: truncated: .*strict=true"):
        extract_run.run(extract_config(cache, [cut], target, strict=True))
    summary = extract_run.run(extract_config(cache, shards, target))
    assert summary["incomplete_input_shards"] == {
        str(cut): "truncated: no end-of-archive marker: the file was cut short or a header is damaged"}
    assert summary["skipped"] == {"duplicate_member": 1} and summary["shards"] == 2
    reader = CacheReader(str(cache))
    keys = sorted(reader[i].key for i in range(len(reader)))
    demo_keys = _tar_keys(demo_shards[0])
    assert keys == sorted(demo_keys + ["x", "z"])
    assert not (cache / "shards" / output_shard_name(str(cut))).exists()

    cut.write_bytes(whole)  # the next run retries the shard that did not read to its end
    summary = extract_run.run(extract_config(cache, shards, target))
    assert summary["incomplete_input_shards"] == {} and summary["shards"] == 3
    assert summary["samples"] == 2 * len(demo_keys) + 2 and summary["duplicate_keys"] == 0
    verify(str(cache), progress=False)


def _tar_keys(path) -> list[str]:
    return sorted({m.name.split(".", 1)[0] for m in tarfile.open(path).getmembers()})
