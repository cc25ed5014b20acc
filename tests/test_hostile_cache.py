"""A cache on disk may lie: real caches, damaged one way each, are refused with one line of the cache's own errors
naming the file and key, or the shard and token; never a traceback, and no file is read without end."""

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid

import fsspec
import pytest
import zarr

from cache_schema import CacheCorruptionError, CacheError, CacheReader, CacheWriter, verify
from cache_schema import storage
from cache_schema.storage import Location
from helpers import ROOT, make_manifest, make_sample, write_target_files
from tools.inspect_cache import main as inspect_main

LENGTHS = (150, 160, 170)  # one shard: offsets 0, 150, 310, 480
MARKER = "shards/shard-000/_COMMITTED.json"


def write_cache(url, tmp_path) -> str:
    """One committed shard of three samples, the target files and summary.json, as an extraction leaves them."""
    manifest = make_manifest(chunk_tokens=64)
    writer = CacheWriter(url, manifest)
    write_target_files(writer, tmp_path)
    shard = writer.shard("shard-000")
    for i, length in enumerate(LENGTHS):
        shard.add(make_sample(f"s{i}", length, manifest, seed=i))
    shard.commit({"source": "input-0"})
    writer.write_summary({})
    return url


@pytest.fixture
def cache(tmp_path) -> str:
    return write_cache(str(tmp_path / "cache"), tmp_path)


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def inspect_message(err: str) -> str:
    """inspect_cache's one line on stderr; anything before it is its progress bar."""
    lines = err.splitlines()
    assert err.endswith("\n") and all(line.startswith("verify:") for line in lines[:-1] if line), err
    assert lines[-1].startswith("inspect_cache: ") and "Traceback" not in err
    return lines[-1]


# Each: (file, what it becomes: new JSON, or raw bytes, from the valid JSON, the message naming file and key).
JSON_DAMAGE = {
    "marker a list": (MARKER, lambda d: [d], r"_COMMITTED.json: the top level must be an object \(got \["),
    "marker a number": (MARKER, lambda d: 7, r"_COMMITTED.json: the top level must be an object \(got 7\)"),
    "marker count a string": (MARKER, lambda d: {**d, "samples": "3"},
                              r"_COMMITTED.json: key samples must be a non-negative integer below 2\*\*63 \(got '3'\)"),
    "marker count negative": (MARKER, lambda d: {**d, "tokens": -1}, r"_COMMITTED.json: key tokens must be a non-neg"),
    "marker count a bool": (MARKER, lambda d: {**d, "supervised_tokens": True}, r"key supervised_tokens must be"),
    "marker count of 5000 digits": (MARKER, lambda d: b'{"samples": 1' + b"0" * 5000 + b"}",
                                    r"_COMMITTED.json: not valid JSON"),
    "marker chunks a list": (MARKER, lambda d: {**d, "chunks": [1]}, r"_COMMITTED.json: key chunks must be an object"),
    "marker chunks entry a string": (MARKER, lambda d: {**d, "chunks": {**d["chunks"], "hidden": "4"}},
                                     r"_COMMITTED.json: key chunks.hidden must be a non-negative integer"),
    "summary a list": ("summary.json", lambda d: [d], r"summary.json: the top level must be an object"),
    "summary shard count a string": ("summary.json", lambda d: {**d, "shard_samples": {"shard-000": "3"}},
                                     r"summary.json: key shard_samples.shard-000 must be a non-negative integer"),
    "checksums a list": ("checksums.json", lambda d: list(d), r"checksums.json: the top level must be an object"),
    "checksum a number": ("checksums.json", lambda d: {**d, "target_head.safetensors": 5},
                          r"checksums.json: key target_head.safetensors must be a sha256 hex digest \(got 5\)"),
    "checksum of a file outside the cache": ("checksums.json", lambda d: {**d, "tokenizer/../../x": "0" * 64},
                                             r"checksums.json: the top level holds an entry named "
                                             r"'tokenizer/../../x'; entry names must be relative paths inside"),
    "manifest a list": ("manifest.json", lambda d: [d], r"manifest.json: the top level must be an object"),
    "manifest nested without end": ("manifest.json", lambda d: b"[" * 100_000, r"manifest.json: not valid JSON"),
    "schema_version garbled": ("manifest.json", lambda d: {**d, "schema_version": "abc"},
                               r"manifest.json: key schema_version must be a string MAJOR.MINOR of two integers "
                               r"\(got 'abc'\)"),
    "schema_version a float": ("manifest.json", lambda d: {**d, "schema_version": 1.1},
                               r"key schema_version must be a string MAJOR.MINOR of two integers \(got 1.1\)"),
    "schema_version without minor": ("manifest.json", lambda d: {**d, "schema_version": "1"},
                                     r"key schema_version must be a string MAJOR.MINOR"),
    "layer id beyond the target's depth": ("manifest.json", lambda d: {**d, "target_layer_ids": [1, 3, 7]},
                                           r"manifest.json: key target_layer_ids must be a non-empty strictly "
                                           r"increasing list of integers in \[0, 6\] \(got \[1, 3, 7\]\)"),
    "layer ids decreasing": ("manifest.json", lambda d: {**d, "target_layer_ids": [5, 3, 1]},
                             r"key target_layer_ids must be a non-empty strictly increasing"),
    "layer ids strings": ("manifest.json", lambda d: {**d, "target_layer_ids": ["1", "3", "5"]},
                          r"key target_layer_ids must be a non-empty strictly increasing"),
    "vocab_size a string": ("manifest.json", lambda d: {**d, "target": {**d["target"], "vocab_size": "300"}},
                            r"manifest.json: key target.vocab_size must be a positive integer below 2\*\*31 "
                            r"\(got '300'\)"),
    "hidden_size zero": ("manifest.json", lambda d: {**d, "target": {**d["target"], "hidden_size": 0}},
                         r"key target.hidden_size must be a positive integer"),
    "target a string": ("manifest.json", lambda d: {**d, "target": "tiny"}, r"key target must be an object"),
    "unknown hidden_dtype": ("manifest.json", lambda d: {**d, "storage": {**d["storage"], "hidden_dtype": "fp4"}},
                             r"key storage.hidden_dtype must be one of bf16, fp8_e4m3 \(got 'fp4'\)"),
    "unknown compression": ("manifest.json", lambda d: {**d, "storage": {**d["storage"], "compression": "lzma"}},
                            r"key storage.compression must be one of none, zstd, blosc_lz4"),
    "chunk_tokens a float": ("manifest.json", lambda d: {**d, "storage": {**d["storage"], "chunk_tokens": 64.0}},
                             r"key storage.chunk_tokens must be a positive integer"),
    "special token beyond the vocabulary": ("manifest.json", lambda d: {**d, "special_tokens": {"pad_token_id": 300}},
                                            r"key special_tokens.pad_token_id must be a token id in \[0, 300\)"),
}


@pytest.mark.parametrize("damage", list(JSON_DAMAGE))
def test_json_of_the_wrong_type_or_range_is_named_by_file_and_key(cache, tmp_path, damage, capsys):
    name, change, message = JSON_DAMAGE[damage]
    path = tmp_path / "cache" / name
    new = change(json.loads(path.read_text()))
    path.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    with pytest.raises(CacheCorruptionError, match=message) as error:
        verify(cache, progress=False)
    one_line(error.value)
    assert inspect_main([cache, "--verify"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and re.search(message, inspect_message(err))


# Each: (array, token, value written there, the message naming shard, token, sample and position).
VALUE_DAMAGE = {
    "token id = vocab": ("input_ids", 160, 300, r"shard shard-000, array input_ids: token 160 \(sample 1, position "
                                                r"10\) holds 300; it must be a token id in \[0, 300\)"),
    "negative token id": ("input_ids", 0, -1, r"array input_ids: token 0 \(sample 0, position 0\) holds -1"),
    "loss mask 2": ("loss_mask", 479, 2, r"array loss_mask: token 479 \(sample 2, position 169\) holds 2; it must be "
                                         r"0 or 1"),
    "negative position": ("position_ids", 5, [5, -1, 5], r"array position_ids: token 5 \(sample 0, position 5\) "
                                                         r"holds \[5, -1, 5\]; it must be position ids in \[0, the "
                                                         r"sample's length\)"),
    "position past the sample": ("position_ids", 150, [0, 0, 160], r"array position_ids: token 150 \(sample 1, "
                                                                   r"position 0\) holds \[0, 0, 160\]"),
}


@pytest.mark.parametrize("damage", list(VALUE_DAMAGE))
def test_verify_refuses_token_values_no_sample_can_hold(cache, tmp_path, damage, capsys):
    # Written through zarr, so every chunk's checksum is right: only the values themselves lie.
    array, token, value, message = VALUE_DAMAGE[damage]
    zarr.open_array(str(tmp_path / "cache" / "shards" / "shard-000" / array), mode="r+")[token] = value
    with pytest.raises(CacheCorruptionError, match=message) as error:
        verify(cache, progress=False)
    one_line(error.value)
    assert inspect_main([cache, "--verify"]) == 1
    assert re.search(message, inspect_message(capsys.readouterr().err))


# Run in a child whose address space is capped, so memory cannot follow an endless file, and under a timeout.
CHILD = textwrap.dedent("""
    import resource, sys
    from cache_schema import CacheError, verify

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        verify(sys.argv[1], progress=False)
    except CacheError as e:
        print(f"{type(e).__name__}: {e}")
""")


def endless(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def fifo(path):
    path.unlink()
    os.mkfifo(path)  # no writer: opening it would block for ever


def huge(path):
    with open(path, "r+b") as f:
        f.truncate(16 << 30)  # sparse: 16 GiB long, nothing on disk


HOSTILE_FILES = {
    "manifest -> /dev/zero": ("manifest.json", endless, "not a regular file"),
    "manifest a FIFO": ("manifest.json", fifo, "not a regular file"),
    "manifest of 16 GiB": ("manifest.json", huge, f"{16 << 30} bytes, above the limit of {storage.JSON_LIMIT}"),
    "marker -> /dev/zero": (MARKER, endless, "not a regular file"),
    "array metadata -> /dev/zero": ("shards/shard-000/input_ids/zarr.json", endless, "not a regular file"),
    "array metadata of 16 GiB": ("shards/shard-000/hidden/zarr.json", huge,
                                 f"{16 << 30} bytes, above the limit of {storage.JSON_LIMIT}"),
    "tokenizer file -> /dev/zero": ("tokenizer/vocab.json", endless, "not a regular file"),
}


@pytest.mark.parametrize("hostile", list(HOSTILE_FILES))
def test_a_file_without_end_is_refused_before_it_is_read(cache, tmp_path, hostile):
    name, make, message = HOSTILE_FILES[hostile]
    make(tmp_path / "cache" / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, cache], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"CacheCorruptionError: {cache}/{name}: {message}\n"


@pytest.fixture
def memory_url():
    url = f"memory://hostile-{uuid.uuid4().hex}"
    yield f"{url}/cache"
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_a_url_is_read_no_further_than_the_limit(memory_url, tmp_path, monkeypatch):
    write_cache(memory_url, tmp_path)
    loc = Location(memory_url)
    manifest = loc.read_json("manifest.json")
    loc.fs.pipe_file(loc.path("manifest.json"), json.dumps(manifest).encode() + b" " * 5000)
    monkeypatch.setattr(storage, "JSON_LIMIT", 4096)
    with pytest.raises(CacheCorruptionError, match=rf"^{memory_url}/manifest.json: more than the limit of 4096 "
                                                   r"bytes$"):
        CacheReader(memory_url)


def plot_into_a_file(tmp_path):
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "h.png")


def manifest_a_folder(cache, tmp_path):
    (tmp_path / "cache" / "manifest.json").unlink()
    (tmp_path / "cache" / "manifest.json").mkdir()
    return [cache]


def vocab_a_string(cache, tmp_path):
    path = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["target"]["vocab_size"] = "300"
    path.write_text(json.dumps(manifest))
    return [cache]


# Each: (the command line, made from the valid cache and tmp_path; exit code; what the one line says).
MISTAKES = {
    "unknown URL scheme": (lambda c, t: ["foo://x"], 1, "inspect_cache: foo://x: no storage for this URL: Protocol "
                                                        "not known: foo"),
    "sample past the end": (lambda c, t: [c, "--sample", "3"], 2, "inspect_cache: --sample 3: the cache holds 3 "
                                                                  "samples, numbered from 0"),
    "negative sample": (lambda c, t: [c, "--sample", "0", "--sample", "-1"], 2, "inspect_cache: --sample -1: "),
    "manifest a folder": (manifest_a_folder, 1, "manifest.json: not a regular file"),
    "cache failing validation": (vocab_a_string, 1, "key target.vocab_size must be a positive integer"),
    "plot into a full disk": (lambda c, t: [c, "--plot", "/dev/full"], 2, "No space left on device"),
    "plot below a file": (lambda c, t: [c, "--plot", plot_into_a_file(t)], 2, "Not a directory"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_inspect_answers_each_mistake_with_one_line(cache, tmp_path, capsys, mistake):
    make_args, code, message = MISTAKES[mistake]
    assert inspect_main(make_args(cache, tmp_path)) == code
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and message in inspect_message(err) and "Traceback" not in out
    if not mistake.startswith("plot"):  # a plot is written after the summary is printed
        assert out == ""


def test_an_unknown_url_scheme_is_a_cache_error():
    with pytest.raises(CacheError, match="^foo://x: no storage for this URL"):
        CacheReader("foo://x")


@pytest.mark.parametrize("make", [endless, huge], ids=["link to /dev/zero", "16 GiB"])
def test_a_chunk_file_no_chunk_could_be_is_refused_before_it_is_read(cache, tmp_path, make):
    """Checked when the shard is opened (one stat per chunk file, as the presence check already made), so zarr's
    reads (verify) and the direct chunk reads (training) never start on it."""
    folder = tmp_path / "cache" / "shards" / "shard-000" / "hidden"
    chunk = next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "zarr.json")
    make(chunk)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHILD, cache], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"CacheCorruptionError: {chunk}: not a regular file of at most")


@pytest.mark.parametrize("node", ["shards/shard-000/zarr.json", "shards/shard-000/input_ids/zarr.json"])
@pytest.mark.parametrize("content", [[], 5, "x", {"zarr_format": 3, "node_type": "group", "attributes": []}],
                         ids=["list", "number", "string", "attributes-list"])
def test_zarr_metadata_of_the_wrong_type_is_refused_in_one_line(cache, node, content):
    """Valid JSON of the wrong types where zarr expects its metadata object: zarr raises TypeError or
    AttributeError on those, which the reader turns into the cache's own error naming the shard."""
    path = os.path.join(cache, node)
    with open(path, "w") as f:
        json.dump(content, f)
    with pytest.raises(CacheCorruptionError, match="shard shard-000.*cannot be opened") as e:
        verify(cache)
    one_line(e.value)


@pytest.mark.parametrize("value", [300, -1])
def test_reading_refuses_a_token_id_outside_the_vocabulary_as_verify_does(cache, tmp_path, value):
    """Training's loader reads through `read_samples`: a token id no embedding row holds (an IndexError deep in
    training before) is the cache's own one-line error naming shard and sample, found without --verify."""
    zarr.open_array(str(tmp_path / "cache" / "shards" / "shard-000" / "input_ids"), mode="r+")[160] = value
    reader = CacheReader(cache)
    assert len(reader.read_samples([0])[0].input_ids) == 150  # the other samples read as before
    with pytest.raises(CacheCorruptionError, match=rf"shard shard-000, sample 1: token id {value} outside the "
                                                   r"target vocabulary \[0, 300\)") as e:
        reader.read_samples([0, 1])
    one_line(e.value)
