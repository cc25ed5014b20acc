"""The cache inspection tool on a real extracted cache."""

import json

import pytest

from extract.config import ExtractConfig, InputConfig, GenerationConfig, TargetConfig
from extract.run import run
from tools.inspect_cache import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_targets, demo_shards):
    out = tmp_path_factory.mktemp("inspect") / "cache"
    run(ExtractConfig(out=str(out), target=TargetConfig(path=str(tiny_targets / "qwen3_vl"), dtype="float32",
                                                        device="cpu", layer_ids=[2, 4, 5]),
                      data=InputConfig(shards=str(demo_shards[0])), generation=GenerationConfig(max_new_tokens=12),
                      progress=False))
    return out


def test_json_summary_and_verify(cache, capsys):
    assert main([str(cache), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 8 and info["shards"] == 1 and info["verify"]["ok"]
    assert info["target_layer_ids"] == [2, 4, 5] and info["image_tokens"] > 0
    assert 0 < info["supervised_tokens"] < info["tokens"]
    # Against the files themselves: the shards' bytes over the tokens, and a bf16 row of 3 layers x hidden 64
    # plus input id (4), loss mask (1) and three positions (12) uncompressed.
    shard_bytes = sum(f.stat().st_size for f in (cache / "shards").rglob("*") if f.is_file())
    assert info["bytes_per_token"] == pytest.approx(shard_bytes / info["tokens"])
    row = 3 * info["hidden_size"] * 2 + 4 + 1 + 12
    assert info["compression_ratio"] == pytest.approx(row * info["tokens"] / shard_bytes)
    assert info["bytes_on_disk"] > shard_bytes  # the head and tokenizer files besides


def test_sample_marks_supervised_and_image_spans(cache, capsys):
    main([str(cache), "--sample", "1"])
    text = capsys.readouterr().out.split("sample 1 ", 1)[1]
    assert "<image x" in text and "<|image_pad|>" not in text
    assert "[[" in text and text.count("[[") == text.count("]]")
    supervised = text.split("[[", 1)[1].split("]]", 1)[0]
    assert "<|im_start|>" not in supervised  # role headers are never supervised


def test_plot_writes_a_png(cache, tmp_path):
    main([str(cache), "--plot", str(tmp_path / "h.png")])
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
