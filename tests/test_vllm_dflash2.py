"""Our DFlash2 exports as vLLM reads them: its own drafter class (qwen3_dflash2.py, vLLM's CPU build from
`make setup-vllm`) takes every tensor of our `dflash` export by name, and computes what we compute: the unary
candidates scaled and capped, the selector's greedy path, the grouped convolution. vLLM's `update_dflash2` reads
the four settings of our `speculators` export. The engine does not serve it here (tests/vllm_dflash2_probe.py says
why)."""

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

from helpers import seeded
from test_export import DRAFTER, LAYERS, make_run
from engines import vllm_python
from train.export import export, load_export
from train.replay import GreedyDrafter

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="no vLLM interpreter: make setup-vllm")
# Heads of 32, what vLLM's CPU attention takes; DFlash2's settings small enough to read.
D2 = replace(DRAFTER, num_attention_heads=1, num_key_value_heads=1, head_dim=32, architecture="dflash2",
             conv_kernel_size=3, conv_group_size=8, selector_rank=6, selector_top_k=5)


def scrambled_run(tmp_path: Path, drafter):
    """A checkpoint whose convolutions and selector are off their no-op start, so a misplaced one shows."""
    ckpt, _, head, _ = make_run(tmp_path, drafter)
    weights = load_file(str(ckpt / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for name, t in weights.items():
        if "conv" in name or "selector" in name:
            weights[name] = t + torch.randn(t.shape, generator=g) * (0.3 if "conv" in name else 1.0)
    save_file(weights, str(ckpt / "model.safetensors"))
    return ckpt, head


def test_vllm_loads_our_dflash2_exports_and_computes_what_we_compute(tmp_path):
    target = tmp_path / "target"  # the target's config alone: vLLM reads its shape, never its weights here
    Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=1,
                num_key_value_heads=1, head_dim=32, architectures=["Qwen3ForCausalLM"]).save_pretrained(target)
    shaped = replace(D2, output_multiplier=0.5, final_logit_softcapping=3.0)
    ckpt, head = scrambled_run(tmp_path / "a", shaped)
    dflash = export(ckpt, "dflash", tmp_path / "dflash", dtype="float32")
    plain, _ = scrambled_run(tmp_path / "b", D2)
    speculators = export(plain, "speculators", tmp_path / "speculators", dtype="float32")
    B = shaped.block_size
    with seeded(0):
        inputs = {"h": torch.randn(6, B - 1, 32) * 3, "anchors": torch.tensor([3, 17, 42, 99, 150, 280]),
                  "conv_in": torch.randn(2 * B, 32), "lm_head": head["lm_head"].float()}
    torch.save(inputs, tmp_path / "inputs.pt")
    probe = Path(__file__).with_name("vllm_dflash2_probe.py")
    done = subprocess.run([str(vllm_python()), str(probe), str(target), str(dflash), str(speculators),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["mismatched"] == []
    assert got["architectures"] == got["speculators_architectures"] == ["DFlash2DraftModel"]
    settings = {"conv_kernel_size": 3, "conv_group_size": 8, "selector_rank": 6, "selector_top_k": 5}
    assert got["dflash_config"].items() >= {**settings, "output_multiplier": 0.5, "final_logit_softcapping": 3.0,
                                            "target_layer_ids": list(LAYERS), "mask_token_id": 299}.items()
    assert got["speculators_dflash_config"].items() >= {**settings, "target_layer_ids": list(LAYERS)}.items()

    ours = load_export(dflash, head["embed_tokens"], head["lm_head"])
    model = ours.model.float()
    h = torch.cat([torch.zeros(6, 1, 32), inputs["h"]], 1)  # slot 0's state is not drafted from
    ids = torch.full((6, B), 299)
    ids[:, 0] = inputs["anchors"]
    with torch.no_grad():
        path, _ = GreedyDrafter.of(model, head["lm_head"], B, 299).pick(h, ids, torch.ones(6, dtype=torch.long))
        conv = model.layers[0].attention_conv
        y, delta = conv.prepare(inputs["conv_in"][None])
        z = conv.finish(inputs["conv_in"][None] * 2, delta)
    assert torch.equal(path, got["path"])
    torch.testing.assert_close(y[0], got["conv_prepare"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[0], got["conv_finish"], rtol=1e-5, atol=1e-5)
    assert json.loads((dflash / "config.json").read_text())["dflash_config"]["block_size"] == B
