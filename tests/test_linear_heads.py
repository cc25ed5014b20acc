"""The learned Qwen3.5 widened to linear-attention heads vLLM's CPU kernels take (tools/demo/linear_heads.py) computes
what the committed one computes: exactly, where the other norms have the widened config's epsilon (the one thing
widening changes beyond the zero padding), and the same greedy answers as it is."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from helpers import seeded
from tools.demo import scenes
from tools.demo.learned_target import held_out_accuracy
from tools.demo.linear_heads import servable, widen
from tools.demo.pipeline import COMMITTED

SOURCE = COMMITTED["qwen3_5"][0] / "model"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def widened(tmp_path_factory):
    return widen(SOURCE, tmp_path_factory.mktemp("wide") / "model")


def load(path):
    with seeded(0):  # from_pretrained initialises the modules first, from the global RNG
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def test_the_widened_heads_have_the_servable_shape(widened):
    text = json.loads((widened / "config.json").read_text())["text_config"]
    assert text["linear_key_head_dim"] == text["linear_value_head_dim"] == 64
    layer = load(widened).model.language_model.layers[0].linear_attn
    assert layer.head_k_dim == layer.head_v_dim == 64 and layer.in_proj_qkv.weight.shape[0] == 2 * 2 * 64 + 4 * 64


def test_widened_computes_what_the_original_does_when_every_norm_has_its_epsilon(widened):
    original, wide = load(SOURCE), load(widened)
    eps = wide.config.text_config.rms_norm_eps
    for module in original.modules():  # all but the gated norms, whose epsilon widening scales with their input
        if "Gated" in type(module).__name__:
            continue
        for name in ("variance_epsilon", "eps"):
            if hasattr(module, name):
                setattr(module, name, eps)
    with seeded(0):
        ids = torch.randint(0, 600, (2, 150))  # past the Gated DeltaNet kernel's 64-token chunks
    with torch.no_grad():
        want, got = original(input_ids=ids).logits, wide(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_widened_answers_the_held_out_prompts_as_the_original_does(widened):
    processor = AutoProcessor.from_pretrained(SOURCE)
    held_out = scenes.samples("heldout", 12, 0)
    want, got = (held_out_accuracy(load(p), processor, held_out, progress=False) for p in (SOURCE, widened))
    assert got["examples"] == want["examples"] and got["exact_match"] == want["exact_match"] > 0.5


def test_refusals_and_reuse(widened, tmp_path):
    with pytest.raises(ValueError, match="narrower than"):
        widen(SOURCE, tmp_path / "narrow", head_dim=8)
    with pytest.raises(ValueError, match="no linear-attention heads"):
        widen(COMMITTED["qwen3_vl"][0] / "model", tmp_path / "vl")
    with pytest.raises(ValueError, match="not a one-file checkpoint directory"):
        widen(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(FileExistsError):
        widen(SOURCE, widened)
    first = servable(SOURCE, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert servable(SOURCE, tmp_path) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
