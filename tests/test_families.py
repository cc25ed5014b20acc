"""The family records (extract/families.py): each one agrees with its transformers classes, an unknown model_type
is one clear refusal, and a family registered through its record alone (a renamed copy of the tiny qwen3, with a
model_type transformers learns at test time) is extracted exactly as its original, speculatively decoded and
exported naming its own class as verifier."""

import json
import shutil
from operator import attrgetter
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from extract import families
from extract.families import FAMILIES, QWEN_CHAT, Family
from extract.run import run as extract
from extract.target import load_target
from helpers import compose_train, extract_config
from tools.fixtures.tiny_targets import SHAPES, build_config, build_tokenizer
from tools.spec_decode import run as spec_decode

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
NAME = "renamed_qwen3"


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_each_record_matches_its_transformers_classes(model_type):
    """Built on the meta device from the tiny shape: the record's Auto class builds it, its paths reach the
    decoder, head and rope index, and what it says of deepstack, M-RoPE and cut-back caches is the config's."""
    record = FAMILIES[model_type]
    config = build_config(model_type, build_tokenizer())
    with torch.device("meta"):
        model = getattr(transformers, record.auto_class).from_config(config)
    decoder = attrgetter(record.decoder)(model)
    assert len(decoder.layers) == config.get_text_config().num_hidden_layers
    assert decoder.embed_tokens is model.get_input_embeddings() and decoder.norm is not None
    assert attrgetter(record.lm_head)(model) is model.get_output_embeddings()
    if record.mrope:
        assert callable(attrgetter(record.rope_index)(model))
    assert record.mrope == ("mrope_section" in config.get_text_config().rope_parameters)
    default = AutoConfig.for_model(model_type)  # the published defaults, not the tiny shape's
    assert record.vision == hasattr(default, "vision_config")
    if record.vision:
        assert record.deepstack_layers(default) == len(getattr(default.vision_config, "deepstack_visual_indexes", ()))
    layer_types = getattr(config.get_text_config(), "layer_types", None) or []
    assert record.recurrent_state == any(t != "full_attention" for t in layer_types)


def test_the_tiny_fixture_and_the_target_configs_know_only_registered_families():
    assert set(SHAPES) == set(FAMILIES)
    named = {p.stem: OmegaConf.load(p).model_type for p in (ROOT / "conf" / "target").glob("*.yaml")}
    assert named and {k: t for k, t in named.items() if t not in FAMILIES} == {}


def test_an_unknown_model_type_is_one_line_naming_the_supported(tmp_path, demo_shards):
    with pytest.raises(ValueError) as info:
        families.family("llama")
    message = str(info.value)
    assert "\n" not in message and "'llama'" in message and all(t in message for t in FAMILIES)
    AutoConfig.for_model("llama", num_hidden_layers=8).save_pretrained(tmp_path / "llama")
    for attempt in (lambda: load_target(str(tmp_path / "llama")),
                    lambda: extract(extract_config(tmp_path / "cache", demo_shards[:1], tmp_path / "llama"))):
        with pytest.raises(ValueError, match="'llama' is not a supported target family; supported: qwen3_vl"):
            attempt()
    assert not (tmp_path / "cache").exists()  # refused before anything is written


class RenamedConfig(Qwen3Config):
    model_type = NAME


class RenamedForCausalLM(Qwen3ForCausalLM):
    config_class = RenamedConfig


# Everything the code needs to know of the renamed family: this record.
RENAMED = Family(NAME, "AutoModelForCausalLM", vision=False, decoder="model", lm_head="lm_head", rope_index=None,
                 deepstack_key=None, recurrent_state=False, chat=QWEN_CHAT)


@pytest.fixture(scope="module")
def renamed(tiny_targets, tmp_path_factory):
    """The tiny qwen3 saved under model_type NAME, with transformers and extract/families.py taught that name
    for this module only: every registry is put back as it was afterwards."""
    path = tmp_path_factory.mktemp("renamed") / NAME
    shutil.copytree(tiny_targets / "qwen3", path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": NAME}, indent=2))
    with pytest.MonkeyPatch.context() as mp:
        # transformers has no unregister: it registers into copies of its registries, the originals come back.
        mp.setattr(CONFIG_MAPPING, "_extra_content", dict(CONFIG_MAPPING._extra_content))
        mp.setattr(AutoModelForCausalLM._model_mapping, "_extra_content",
                   dict(AutoModelForCausalLM._model_mapping._extra_content))
        AutoConfig.register(NAME, RenamedConfig)
        AutoModelForCausalLM.register(RenamedConfig, RenamedForCausalLM)
        mp.setitem(FAMILIES, NAME, RENAMED)
        yield path
    assert NAME not in CONFIG_MAPPING and NAME not in FAMILIES


@pytest.fixture(scope="module")
def caches(renamed, tiny_targets, demo_shards, tmp_path_factory):
    """Caches of one demo shard by the tiny qwen3 and by its renamed copy."""
    out = tmp_path_factory.mktemp("family_caches")
    for name, target in (("original", tiny_targets / "qwen3"), (NAME, renamed)):
        extract(extract_config(out / name, demo_shards[1:], target, max_new_tokens=16))
    return out / "original", out / NAME


def test_the_renamed_family_is_extracted_exactly_as_its_original(caches):
    """Every file alike but for the target's identity in the manifest and the times of the run."""
    original, copy = caches
    files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix != ".json":
            assert (original / rel).read_bytes() == (copy / rel).read_bytes(), rel
        elif rel.name != "summary.json":
            a, b = (json.loads((c / rel).read_text()) for c in caches)
            for d in (a, b):
                d.pop("committed_at", None)
            if rel.name == "manifest.json":
                assert (a.pop("target")["model_type"], b.pop("target")["model_type"]) == ("qwen3", NAME)
            assert a == b, rel


def test_the_renamed_family_decodes_speculatively(caches, renamed, demo_shards, tmp_path):
    from train.export import export
    from train.loop import train

    cfg = compose_train("setup=tiny", f"data.cache={caches[1]}", "optim.max_steps=4", "log_every=4", "save_every=0",
                        "eval_every=0", "data.eval_shards=0", "progress=false", "objective.num_anchors=16")
    cfg.run_dir = str(tmp_path / "run")
    train(cfg)
    report = spec_decode(str(renamed), Path(cfg.run_dir), shards=str(demo_shards[1]), max_prompts=3,
                         max_new_tokens=12, progress=False)
    assert report["lossless"] and report["samples"] == 3 and report["cycles"] > 0
    spec = json.loads((export(Path(cfg.run_dir), "speculators", tmp_path / "spec") / "config.json").read_text())
    assert spec["speculators_config"]["verifier"]["architectures"] == ["RenamedForCausalLM"]
