"""Exports for vLLM (speculators) and SGLang / the original DFlash code (dflash): layout, loader rules, refusals,
and the same block logits after a round trip through our loader and through transformers' AutoModel."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache_schema import CacheWriter
from helpers import make_manifest, seeded, write_target_files
from train import checkpoint
from train.attention import build_mask
from train.config import DrafterConfig
from train.export import check_exportable, drafter_weight_names, export, load_export, main
from train.model import Drafter

LAYERS = (1, 3, 5)  # make_manifest's target has 8 layers
DRAFTER = DrafterConfig(hidden_size=32, vocab_size=300, target_layer_ids=list(LAYERS), num_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                        rope_theta=10_000.0, max_position_embeddings=512, block_size=4, mask_token_id=299)
DRAFT_IDS = torch.tensor([0, 5, 17, 42, 120, 298])


def make_run(tmp_path: Path, drafter: DrafterConfig = DRAFTER, model_type: str = "qwen3", draft_ids=None,
             record_cache: bool = True):
    """A real cache holding the target head, and a one-checkpoint run of a randomly initialised drafter."""
    manifest = make_manifest(hidden_size=32, layers=LAYERS, vocab=300)
    manifest.target.model_type = model_type
    url = str(tmp_path / "cache")
    head = write_target_files(CacheWriter(url, manifest), tmp_path)
    with seeded(0), torch.no_grad():
        model = Drafter(drafter, head["embed_tokens"], head["lm_head"])
        for name, p in model.named_parameters():  # norms away from 1, so a swapped or missing norm changes the output
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    config = {"drafter": asdict(drafter), "data": {"cache": url if record_cache else None}}
    snap = checkpoint.Snapshot(checkpoint.TrainState(step=1), model.state_dict(), opt, sched, config,
                               manifest.to_dict(), draft_ids)
    ckpt = checkpoint.save(tmp_path / "run", snap, keep_last=1)
    return ckpt, model, head, url


def block_inputs(d: DrafterConfig, anchor: int = 7):
    """A context of `anchor` positions and the block drafted at it: [token, MASK x (B-1)]."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, anchor, len(d.target_layer_ids), d.hidden_size, generator=g) * 3
    ctx_pos = torch.arange(anchor)[None]
    block_ids = torch.tensor([[17] + [d.mask_token_id] * (d.block_size - 1)])
    block_pos = anchor + torch.arange(d.block_size)[None]
    return hidden, ctx_pos, block_ids, block_pos


def drafter_logits(model: Drafter, head_VH: torch.Tensor, inputs) -> torch.Tensor:
    hidden, ctx_pos, block_ids, block_pos = inputs
    anchor, block = hidden.shape[1], block_ids.shape[1]
    mask = build_mask(torch.tensor([[anchor]]), torch.tensor([anchor]), anchor, block, "dense")
    with torch.no_grad():
        return model(hidden, ctx_pos, block_ids, block_pos, mask) @ head_VH.T


def all_items(obj) -> list[tuple]:
    """Every (key, value) pair of a JSON document, nested ones included."""
    if isinstance(obj, dict):
        return list(obj.items()) + [kv for v in obj.values() for kv in all_items(v)]
    if isinstance(obj, list):
        return [kv for v in obj for kv in all_items(v)]
    return []


def test_speculators_export_has_vllm_keys_and_exact_tensor_names(tmp_path):
    ckpt, _, _, _ = make_run(tmp_path)
    out = export(ckpt, "speculators", tmp_path / "spec", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "dflash"
    spec = config["speculators_config"]
    assert spec["algorithm"] == "dflash"
    assert spec["proposal_methods"][0]["speculative_tokens"] == DRAFTER.block_size - 1
    assert spec["default_proposal_method"] == spec["proposal_methods"][0]["proposal_type"]
    assert spec["verifier"] == {"name_or_path": "tiny-target", "architectures": ["Qwen3ForCausalLM"]}
    assert config["aux_hidden_state_layer_ids"] == [i + 1 for i in LAYERS]
    assert (config["mask_token_id"], config["block_size"]) == (299, 4)
    assert config["draft_vocab_size"] == 300  # written even for the full vocabulary
    assert config["target_hidden_size"] == 32
    assert config["sliding_window_non_causal"] is True and config["sample_from_anchor"] is False
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "qwen3"
    assert (layer["vocab_size"], layer["hidden_size"], layer["num_hidden_layers"]) == (300, 32, 2)
    assert layer["rope_theta"] == layer["rope_parameters"]["rope_theta"] == 10_000.0
    assert layer["layer_types"] == ["full_attention"] * 2 and layer["is_causal"] is False
    assert not layer["use_sliding_window"]
    assert config["dflash_offline"]["source_checkpoint"] == str(ckpt.resolve())
    assert config["dflash_offline"]["position_source"] == "sequential"
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == drafter_weight_names(DRAFTER)  # no lm_head, d2t or t2d: vLLM then shares the target's head
    assert "layers.1.self_attn.k_norm.weight" in tensors and tensors["fc.weight"].shape == (32, 3 * 32)


def test_dflash_export_has_original_layout_and_its_modeling_file(tmp_path):
    ckpt, _, _, _ = make_run(tmp_path)
    out = export(ckpt, "dflash", tmp_path / "dflash")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"]
    assert config["dflash_config"] == {"mask_token_id": 299, "target_layer_ids": list(LAYERS)}
    assert (config["block_size"], config["num_target_layers"]) == (4, 8)
    assert config["model_type"] == "qwen3" and config["num_hidden_layers"] == 2 and config["head_dim"] == 8
    assert config["rope_theta"] == 10_000.0 and config["layer_types"] == ["full_attention"] * 2
    assert config["auto_map"] == {"AutoModel": "modeling_dflash.DFlashDraftModel"}
    modeling = (out / "modeling_dflash.py").read_text()
    imports = [line.split()[1] for line in modeling.splitlines() if line.startswith(("import ", "from "))]
    assert {name.split(".")[0] for name in imports} <= {"torch", "transformers"}
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == drafter_weight_names(DRAFTER)  # no lm_head / embed_tokens: its loader reports them
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())  # the default dtype


def test_reduced_vocabulary_exports_head_rows_and_id_maps(tmp_path):
    ckpt, model, head, _ = make_run(tmp_path, draft_ids=DRAFT_IDS)
    out = export(ckpt, "speculators", tmp_path / "spec", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == len(DRAFT_IDS)
    assert config["transformer_layer_config"]["vocab_size"] == 300
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == drafter_weight_names(DRAFTER) | {"lm_head.weight", "d2t", "t2d"}
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and t2d.shape == (300,)
    assert torch.equal(torch.arange(len(DRAFT_IDS)) + d2t, DRAFT_IDS)
    assert torch.equal(t2d.nonzero().flatten(), DRAFT_IDS)
    assert torch.equal(tensors["lm_head.weight"], head["lm_head"][DRAFT_IDS])
    # What vLLM computes: draft logits scattered to target ids, -inf elsewhere; equal to our logits at those ids.
    inputs = block_inputs(DRAFTER)
    hidden = drafter_logits(model, torch.eye(32), inputs)  # the final hidden states themselves
    draft_logits = hidden @ tensors["lm_head.weight"].T
    served = torch.full((*draft_logits.shape[:-1], 300), float("-inf"))
    served[..., torch.arange(len(DRAFT_IDS)) + d2t] = draft_logits
    ours = drafter_logits(model, head["lm_head"], inputs)
    assert torch.allclose(served[..., DRAFT_IDS], ours[..., DRAFT_IDS], atol=1e-5)
    assert torch.isinf(served[..., ~t2d]).all()
    back = load_export(out)
    assert torch.equal(back.draft_ids, DRAFT_IDS) and torch.equal(back.draft_head_VH, tensors["lm_head.weight"])


def test_reduced_vocabulary_needs_the_cache_head(tmp_path):
    ckpt, _, _, url = make_run(tmp_path, draft_ids=DRAFT_IDS, record_cache=False)
    with pytest.raises(ValueError, match="--cache"):
        export(ckpt, "speculators", tmp_path / "spec")
    with pytest.raises(ValueError, match="could not be read"):
        export(ckpt, "speculators", tmp_path / "spec", cache=str(tmp_path / "nowhere"))
    out = export(ckpt, "speculators", tmp_path / "spec", cache=url)
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))


def test_qwen3_vl_drafter_export_carries_no_mrope_field(tmp_path):
    ckpt, _, _, _ = make_run(tmp_path, model_type="qwen3_vl")
    for fmt in ("speculators", "dflash"):
        config = json.loads((export(ckpt, fmt, tmp_path / fmt) / "config.json").read_text())
        items = all_items(config)
        assert not [key for key, _ in items if "mrope" in key]
        assert all(value is None for key, value in items if key == "rope_scaling")
        assert all(value == 1 for key, value in items if key == "partial_rotary_factor")
        assert {value for key, value in items if key == "model_type"} == {"qwen3"}
    spec = json.loads((tmp_path / "speculators" / "config.json").read_text())
    assert spec["speculators_config"]["verifier"]["architectures"] == ["Qwen3VLForConditionalGeneration"]


@pytest.mark.parametrize("change, fmt, reduced, reason", [
    ({"target_layer_ids": [1, 3, 7]}, "speculators", False, "last one"),
    ({"target_layer_ids": [1, 3, 8]}, "dflash", False, r"include \[8\]"),
    ({"partial_rotary_factor": 0.25}, "speculators", False, "SGLang before 0.5.23 rotates the whole head"),
    ({"partial_rotary_factor": 0.25}, "dflash", False, "partial_rotary_factor=0.25"),
    ({}, "dflash", True, "reduced draft vocabulary"),
    ({"position_source": "mrope_axis0"}, "dflash", False, "feed plain token indices"),
    ({"mask_token_id": 300}, "speculators", False, "mask_token_id=300"),
])
def test_exports_engines_would_run_differently_are_refused(change, fmt, reduced, reason):
    manifest = make_manifest(layers=LAYERS)
    manifest.target.model_type = "qwen3_vl"
    with pytest.raises(ValueError, match=reason):
        check_exportable(replace(DRAFTER, **change), manifest, fmt, reduced)


def test_refusal_writes_nothing_and_axis0_positions_warn_for_vllm(tmp_path):
    ckpt, _, _, _ = make_run(tmp_path, replace(DRAFTER, target_layer_ids=[1, 3, 7]))
    with pytest.raises(ValueError, match="final norm"):
        export(ckpt, "speculators", tmp_path / "spec")
    assert not (tmp_path / "spec").exists()
    manifest = make_manifest(layers=LAYERS)
    axis0 = replace(DRAFTER, position_source="mrope_axis0")
    check_exportable(axis0, manifest, "dflash", False)  # a text target: axis 0 is the token index
    manifest.target.model_type = "qwen3_vl"
    with pytest.warns(UserWarning, match="only vLLM's V1 model runner"):
        check_exportable(axis0, manifest, "speculators", False)


@pytest.mark.parametrize("fmt", ["speculators", "dflash"])
def test_export_loads_back_with_identical_block_logits(tmp_path, fmt):
    ckpt, model, head, _ = make_run(tmp_path)
    main([str(tmp_path / "run"), "--format", fmt, "--out", str(tmp_path / fmt), "--dtype", "float32"])
    inputs = block_inputs(DRAFTER)
    want = drafter_logits(model, head["lm_head"], inputs)
    back = load_export(tmp_path / fmt, head["embed_tokens"], head["lm_head"])
    assert back.format == fmt and back.drafter == DRAFTER
    assert torch.allclose(drafter_logits(back.model, head["lm_head"], inputs), want, atol=1e-6, rtol=0)
    if fmt == "dflash":
        from transformers import AutoModel

        # attn_implementation="sdpa" as the original DFlash loaders ask: the class must declare it.
        hf = AutoModel.from_pretrained(tmp_path / fmt, trust_remote_code=True, dtype=torch.float32,
                                       attn_implementation="sdpa").eval()
        hidden, ctx_pos, block_ids, block_pos = inputs
        with torch.no_grad():
            out = hf(target_hidden=hidden.flatten(2), noise_embedding=head["embed_tokens"][block_ids],
                     position_ids=torch.cat([ctx_pos, block_pos], dim=1))
        assert torch.allclose(out @ head["lm_head"].T, want, atol=1e-5, rtol=0)


def test_out_that_is_not_an_earlier_export_is_refused_and_left_as_it_was(tmp_path):
    ckpt, _, _, _ = make_run(tmp_path)
    weights = (ckpt / "model.safetensors").read_bytes()
    for out, reason in ((ckpt, "inside the checkpoint or run directory"),
                        (tmp_path / "run", "inside the checkpoint or run directory"),
                        (ckpt / "export", "inside the checkpoint or run directory")):
        with pytest.raises(ValueError, match=reason):
            export(ckpt, "speculators", out)
    assert (ckpt / "model.safetensors").read_bytes() == weights and not (ckpt / "export").exists()
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a speculators export"):
        export(ckpt, "speculators", unrelated)
    assert [p.name for p in unrelated.iterdir()] == ["todo.txt"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export(ckpt, "speculators", tmp_path / "a-file")
    export(ckpt, "speculators", tmp_path / "spec")
    with pytest.raises(ValueError, match="--overwrite"):
        export(ckpt, "speculators", tmp_path / "spec")
    with pytest.raises(ValueError, match="not a dflash export"):
        export(ckpt, "dflash", tmp_path / "spec", overwrite=True)
    export(ckpt, "speculators", tmp_path / "spec", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    # A published DFlash drafter (another tool's export, beside its README) is never ours to replace.
    theirs = tmp_path / "z-lab-drafter"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps({"dflash_config": {"mask_token_id": 1}}))
    (theirs / "model.safetensors").write_bytes(b"weights")
    (theirs / "README.md").write_text("theirs")
    with pytest.raises(ValueError, match="not a dflash export written by train.export"):
        export(ckpt, "dflash", theirs, overwrite=True)
    assert sorted(p.name for p in theirs.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_main_reports_a_refusal_in_one_line(tmp_path, capsys):
    ckpt, _, _, _ = make_run(tmp_path)
    with pytest.raises(SystemExit, match="^train.export: --out .* inside the checkpoint"):
        main([str(ckpt), "--format", "dflash", "--out", str(ckpt)])


def test_dflash2_exports_carry_its_settings_where_each_engine_reads_them(tmp_path):
    d2 = replace(DRAFTER, architecture="dflash2", conv_kernel_size=2, conv_group_size=8, selector_rank=4,
                 selector_top_k=3, output_multiplier=0.5, final_logit_softcapping=30.0)
    ckpt, model, head, _ = make_run(tmp_path, d2)
    out = export(ckpt, "dflash", tmp_path / "dflash", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlash2DraftModel"] and "auto_map" not in config
    assert config["dflash_config"] == {"mask_token_id": 299, "target_layer_ids": list(LAYERS), "block_size": 4,
                                       "conv_kernel_size": 2, "conv_group_size": 8, "selector_rank": 4,
                                       "selector_top_k": 3, "output_multiplier": 0.5, "final_logit_softcapping": 30.0}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no DFlash modeling file
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == drafter_weight_names(d2)
    assert {"layers.1.mlp_conv.base_kernel", "candidate_selector.successor_codebook"} <= set(tensors)
    back = load_export(out, head["embed_tokens"], head["lm_head"])
    assert back.drafter == replace(d2, vocab_size=300, hidden_size=32)
    for name, t in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], t), name
    # vLLM's speculators reader passes only the four settings on: a scaled or capped drafter is refused there.
    with pytest.raises(ValueError, match="export --format dflash"):
        export(ckpt, "speculators", tmp_path / "spec")
    plain, _, _, _ = make_run(tmp_path / "plain", replace(d2, output_multiplier=1.0, final_logit_softcapping=None))
    config = json.loads((export(plain, "speculators", tmp_path / "spec") / "config.json").read_text())
    assert (config["speculators_model_type"], config["architectures"]) == ("dflash2", ["DFlash2DraftModel"])
    assert {k: config[k] for k in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")} == {
        "conv_kernel_size": 2, "conv_group_size": 8, "selector_rank": 4, "selector_top_k": 3}
    assert config["speculators_config"]["algorithm"] == "dflash2"
    # A reduced vocabulary: neither engine maps DFlash2's candidates through d2t.
    reduced, _, _, _ = make_run(tmp_path / "reduced", replace(d2, output_multiplier=1.0,
                                                              final_logit_softcapping=None), draft_ids=DRAFT_IDS)
    for fmt in ("speculators", "dflash"):
        with pytest.raises(ValueError, match="reduced draft vocabulary"):
            export(reduced, fmt, tmp_path / f"reduced-{fmt}")
        assert not (tmp_path / f"reduced-{fmt}").exists()
