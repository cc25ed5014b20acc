"""What a cache's hidden states hold: the audit (per layer RMS, zeros, non-finite values, spread; dead, non-finite and
outlier layers flagged), its verdict in summary.json, training's refusal of a flagged cache, and --recompute against
a fresh forward of the target."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from cache_schema import CacheReader, CacheWriter
from cache_schema.audit import audit
from extract.run import run as extract
from helpers import extract_config, make_manifest, make_sample, tiny, write_target_files
from tools.inspect_cache import main as inspect_main
from tools.recompute import recompute
from train.loop import train


def cache_with(tmp_path, damage=None) -> str:
    """Two shards of random samples (layers 1, 3, 5), `damage(hidden_TLH)` applied to every sample's states."""
    manifest = make_manifest(hidden_size=32, layers=(1, 3, 5), vocab=64)
    url = str(tmp_path / "cache")
    writer = CacheWriter(url, manifest)
    write_target_files(writer, tmp_path)
    for s in range(2):
        shard = writer.shard(f"shard-{s:03d}")
        for i in range(6):
            sample = make_sample(f"s{s}{i}", 40 + 4 * i, manifest, seed=10 * s + i)
            sample.input_ids = (np.arange(len(sample)) % 8).astype(np.int32)
            if damage is not None:
                sample.hidden_TLH = damage(sample.hidden_TLH.clone())
            shard.add(sample)
        shard.commit()
    return url


def zero_layer(h):
    h[:, 1] = 0
    return h


def constant_layer(h):
    h[:, 1] = h[0, 1]
    return h


def inf_in_layer(h):
    h[3, 2, 5] = float("inf")
    return h


def huge_layer(h):
    h[:, 0] *= 1000
    return h


@pytest.mark.parametrize("damage, layer, flag", [(zero_layer, "3", "dead"), (constant_layer, "3", "dead"),
                                                 (inf_in_layer, "5", "non_finite"), (huge_layer, "1", "outlier")])
def test_audit_flags_the_damaged_layer_only(tmp_path, damage, layer, flag):
    report = audit(CacheReader(cache_with(tmp_path, damage)))
    assert report["flagged"] == {layer: [flag]}
    assert report["verdict"] == f"flagged: layer {layer} {flag}"
    healthy = audit(CacheReader(cache_with(tmp_path / "healthy")))
    assert healthy["flagged"] == {} and healthy["verdict"] == "ok"
    assert all(0 < x["rms"] and x["zero_share"] < 0.01 and x["non_finite"] == 0 for x in healthy["layers"])


def test_training_refuses_a_dead_layer_unless_told(tmp_path):
    url = cache_with(tmp_path, zero_layer)
    overrides = ("drafter.mask_token_id=63", "optim.max_steps=2", "eval_every=0")
    with pytest.raises(ValueError, match=r"its audit flags target layer\(s\) 3 dead: .*data.accept_flagged_layers"):
        train(tiny(url, tmp_path / "run", *overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()
    state = train(tiny(url, tmp_path / "run2", *overrides, "data.accept_flagged_layers=true"))
    assert state.step == 2


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_extraction_records_the_audit_and_inspect_shows_and_plots_it(tmp_path, tiny_targets, demo_shards, capsys,
                                                                     family):
    """Every captured layer alive, the hybrid target's (Gated DeltaNet) included: vLLM returned all-zero states for
    those until #46301, which this audit would flag."""
    out = tmp_path / "cache"
    extract(extract_config(out, demo_shards, tiny_targets / family))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"]["verdict"] == "ok" and summary["audit"]["samples"] == summary["samples"]
    assert [x["layer"] for x in summary["audit"]["layers"]] == [2, 4, 5]
    assert all(x["rms"] > 0 and x["zero_share"] < 0.01 for x in summary["audit"]["layers"])
    assert f"audit of {summary['samples']} samples' hidden states: ok" in capsys.readouterr().out
    png = tmp_path / "audit.png"
    assert inspect_main([str(out), "--audit", "--audit-plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "| layer | RMS | exact zeros | non-finite | RMS spread across samples | flags |" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    flagged = cache_with(tmp_path / "dead", zero_layer)
    assert inspect_main([flagged, "--audit", "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["audit"]["flagged"] == {"3": ["dead"]}


def test_recompute_agrees_with_the_target_and_catches_another_one(tmp_path, tiny_targets, demo_shards, capsys):
    """A fp32 extraction is the target's forward rounded to bf16 (relative error about 2^-9); a target with one
    layer changed differs from that layer on, far beyond the tolerance; images come back from the input shards,
    and a sample whose shard is gone is named, not rechecked."""
    target = tmp_path / "target"
    shutil.copytree(tiny_targets / "qwen3_vl", target)
    shards = [Path(shutil.copy(s, tmp_path)) for s in demo_shards]
    out = tmp_path / "cache"
    extract(extract_config(out, shards, target))
    report = recompute(CacheReader(str(out)), 6)
    assert report["rechecked"] == 6 and not report["not_rechecked"] and report["beyond_tolerance"] == []
    assert all(x["relative_error"] < 4e-3 for x in report["layers"]), report["layers"]
    weights = load_file(str(target / "model.safetensors"))
    name = next(k for k in weights if "language_model.layers.3.mlp.down_proj.weight" in k)
    weights[name] = weights[name] * 100
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    assert inspect_main([str(out), "--recompute", "6"]) == 3
    text = capsys.readouterr().out
    rows = {int(line.split("|")[1]): line.split("|")[3].strip() for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert rows == {2: "yes", 4: "NO", 5: "NO"}  # layer 3 changed: the capture of layer 2 still agrees
    for s in shards:
        s.unlink()
    report = recompute(CacheReader(str(out)), 16)
    assert report["not_rechecked"] and all("is gone" in why for why in report["not_rechecked"].values())
    assert report["rechecked"] + len(report["not_rechecked"]) == 16  # text-only samples need no shard
