"""The scene task and the learned tiny target: determinism, image-dependent answers, shards, a short training."""

import json
import random
import shutil
from collections import Counter
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from extract.formats import parse_sample
from extract.sources import tar_records
from tools.demo import learned_target as lt
from tools.demo import scenes

# A first phase that trains in about a second.
TINY = lt.Settings(train_samples=32, steps=4, batch_size=8, lr=1e-2, warmup=1, eval_samples=2, threads=1)


def test_same_seed_gives_the_same_samples_and_shard_bytes(tmp_path):
    a = [scenes.to_record(s) for s in scenes.samples("train", 12, seed=3)]
    b = [scenes.to_record(s) for s in scenes.samples("train", 12, seed=3)]
    assert a == b
    assert a != [scenes.to_record(s) for s in scenes.samples("train", 12, seed=4)]
    first = scenes.write_task_shards(tmp_path / "a", "train", 10, seed=3, samples_per_shard=4)
    second = scenes.write_task_shards(tmp_path / "b", "train", 10, seed=3, samples_per_shard=4)
    assert [p.name for p in first] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_splits_do_not_share_images():
    def images(split):
        return {scenes.png_bytes(img) for s in scenes.samples(split, 200) for img in s.images}

    train, held_out = images("train"), images("heldout")
    assert len(held_out) > 150 and not held_out & train


def _cell_colours(img, cell: int) -> Counter:
    x, y = (cell % scenes.GRID) * scenes.CELL, (cell // scenes.GRID) * scenes.CELL
    crop = img.crop((x, y, x + scenes.CELL, y + scenes.CELL))
    return Counter(crop.get_flattened_data())


def test_the_image_shows_what_the_answer_says():
    rng = random.Random(0)
    for _ in range(30):
        scene = scenes.random_scene(rng)
        img = scenes.render(scene, rng)
        background = img.getpixel((0, 0)) if 0 not in scene else img.getpixel((scenes.SIZE - 1, scenes.SIZE - 1))
        for cell in range(scenes.GRID * scenes.GRID):
            colours = _cell_colours(img, cell)
            if cell in scene:
                main = next(c for c, _ in colours.most_common() if c != background)
                assert main == scenes.COLOURS[scene[cell].colour], (cell, scene[cell])
                assert f"At the {scenes.POSITIONS[cell]} there is a {scene[cell].name}." in scenes.describe(scene)
            elif background[0] == background[1] == background[2]:
                assert set(colours) == {background}


def test_different_scenes_give_different_answers():
    rng = random.Random(1)
    pairs = {}
    for _ in range(60):
        scene = scenes.random_scene(rng)
        pairs[tuple(scene.items())] = scenes.describe(scene)
    assert len(set(pairs.values())) == len(pairs) > 50
    # The same question on two scenes: the answers differ wherever the scenes do.
    a, b = {0: scenes.Obj("red", "circle")}, {0: scenes.Obj("blue", "7")}
    qa = scenes.ask_what_at(a, random.Random(5))
    qb = scenes.ask_what_at(b, random.Random(5))
    assert qa["question"] == qb["question"] and qa["canonical"] != qb["canonical"]


def test_shards_parse_with_the_pipeline_and_carry_reference_answers(tmp_path):
    paths = scenes.write_task_shards(tmp_path, "heldout", 24, seed=0, samples_per_shard=10)
    expected = {s.key: s for s in scenes.samples("heldout", 24, seed=0)}
    seen = Counter()
    records = (r for p in paths for r in tar_records(str(p), None))
    for record in records:
        conv = parse_sample(record, source="test")
        sample = expected[conv.key]
        assert len(conv.images) == len(sample.images)
        assert [i.tobytes() for i in conv.images] == [i.tobytes() for i in sample.images]
        answers = [m["content"][0]["text"] for m in conv.messages if m["role"] == "assistant"]
        assert answers == [t["reference"] for t in sample.turns]
        assert all(t["reference"] != t["canonical"] for t in sample.turns)
        assert json.loads(record["json"])["task"]["canonical"] == [t["canonical"] for t in sample.turns]
        seen[sample.kind] += 1
    assert sum(seen.values()) == 24 and set(seen) == set(scenes.KINDS)


def test_labels_cover_exactly_the_canonical_answers_and_end_of_turn():
    batch = scenes.samples("train", 16, seed=2)
    processor = lt.build_processor_for(batch)
    tok = processor.tokenizer
    for sample, item in zip(batch, lt.encode(processor, batch)):
        supervised = item["input_ids"][item["labels"] != -100].tolist()
        want = "".join(t["canonical"] + "<|im_end|>" for t in sample.turns)
        assert tok.decode(supervised, skip_special_tokens=False) == want
        image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        # 64x64 at patch 16, merge 2: four image tokens per image, one per cell.
        assert (item["input_ids"] == image_pad).sum() == 4 * len(sample.images)
        assert torch.equal(item["mm_token_type_ids"] == 1, item["input_ids"] == image_pad)


def test_short_training_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    settings = lt.Settings(train_samples=64, steps=10, batch_size=8, lr=1e-2, warmup=2, eval_samples=3, threads=1)
    built = lt.ensure(tmp_path, settings, progress=False)
    assert built == tmp_path / f"learned-target-{settings.key()}" and not list(tmp_path.glob("*.partial"))
    report = json.loads((built / "accuracy.json").read_text())
    losses = report["losses"]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    assert report["turns"] > 0 and 0 <= report["exact_match"] <= 1
    stamp = (built / "accuracy.json").stat().st_mtime_ns
    assert lt.ensure(tmp_path, settings, progress=False) == built  # reused, not rebuilt
    assert (built / "accuracy.json").stat().st_mtime_ns == stamp
    model = AutoModelForImageTextToText.from_pretrained(built / "model")
    processor = AutoProcessor.from_pretrained(built / "model")
    assert model.config.model_type == "qwen3_vl" and model.config.vision_config.deepstack_visual_indexes
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (settings.text_hidden, settings.text_layers,
                                                                         settings.head_dim)
    assert sum(text.rope_parameters["mrope_section"]) * 2 == settings.head_dim
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The loaded checkpoint answers the held-out prompts exactly as the trained model did.
    again = lt.held_out_accuracy(model, processor, scenes.samples("heldout", settings.eval_samples, settings.seed),
                        progress=False)
    assert again["examples"] == report["examples"]


def test_fine_tuning_an_earlier_build_gives_what_both_phases_from_scratch_give(tmp_path):
    # Bit-identical: one process, one thread, the same kernels for both.
    first = TINY
    both = replace(first, finetune_steps=3, finetune_lr=5e-3)
    lt.build(tmp_path / "first", first, progress=False)
    scratch = lt.build(tmp_path / "scratch", both, progress=False)
    resumed = lt.build(tmp_path / "resumed", both, progress=False, start_from=tmp_path / "first")
    assert len(scratch["losses"]) == 7 and resumed["losses"] == scratch["losses"]
    assert resumed["final_loss"] == scratch["final_loss"]
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("scratch", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(tmp_path / "first" / "model" / "model.safetensors")
    assert not all(torch.equal(a[k], before[k]) for k in a)
    assert resumed["first_phase"]["key"] == first.key() and "first_phase" not in scratch
    assert resumed["examples"] == scratch["examples"]


def test_fine_tuning_refuses_a_start_it_cannot_continue_before_writing(tmp_path):
    first = TINY
    both = replace(first, finetune_steps=3)
    lt.build(tmp_path / "first", first, progress=False)
    with pytest.raises(lt.Refused, match=r"other settings: lr=0.01 \(here 0.02\), seed=0 \(here 1\)"):
        lt.build(tmp_path / "out", replace(both, lr=2e-2, seed=1), progress=False, start_from=tmp_path / "first")
    with pytest.raises(lt.Refused, match="needs --finetune-steps"):
        lt.build(tmp_path / "out", first, progress=False, start_from=tmp_path / "first")
    with pytest.raises(lt.Refused, match="not a learned target build"):
        lt.build(tmp_path / "out", both, progress=False, start_from=tmp_path)
    with pytest.raises(lt.Refused, match="is the output directory"):
        lt.build(tmp_path / "first", both, progress=False, start_from=tmp_path / "first")
    with pytest.raises(lt.Refused, match="holds a learned target build already"):
        lt.build(tmp_path / "first", first, progress=False)
    lt.build(tmp_path / "tuned", both, progress=False, start_from=tmp_path / "first")
    with pytest.raises(lt.Refused, match="fine-tuned already"):
        lt.build(tmp_path / "out", both, progress=False, start_from=tmp_path / "tuned")
    # A build whose report says these settings but whose tokenizer is another's (built from fewer samples).
    lt.build(tmp_path / "fewer", replace(first, train_samples=4), progress=False)
    shutil.copytree(tmp_path / "first", tmp_path / "lies")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "fewer" / "model" / name, tmp_path / "lies" / "model" / name)
    with pytest.raises(lt.Refused, match="its tokenizer is not the one"):
        lt.build(tmp_path / "out", both, progress=False, start_from=tmp_path / "lies")
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_refused_with_the_key_to_change():
    with pytest.raises(ValueError, match="steps=0"):
        lt.Settings(steps=0)
    with pytest.raises(ValueError, match="warmup=50"):
        lt.Settings(steps=20, warmup=50)
    with pytest.raises(ValueError, match="head_dim=20"):
        lt.Settings(head_dim=20)
    with pytest.raises(ValueError, match="finetune_steps=-1"):
        lt.Settings(finetune_steps=-1)
    with pytest.raises(ValueError, match=r"warmup=30 must lie in \[0, finetune_steps=10\)"):
        lt.Settings(finetune_steps=10)
