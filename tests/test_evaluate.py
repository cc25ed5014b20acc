"""Offline acceptance replay against a naive per-cycle loop that drafts each block alone, and the CLI on a cache."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.helpers import counting_cache, seeded
from train.config import DrafterConfig
from train.evaluate import evaluate_checkpoint
from train.evaluate import main as evaluate_main
from train.loop import train
from train.model import Drafter
from train.replay import (Cycles, GreedyDrafter, accepted_lengths, branch_points, matched, replay_sample, spans,
                          replay_figures, walk)

V, H, L, BLOCK, MASK = 8, 32, 3, 4, 7
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_drafter(seed, block=BLOCK, **kw):
    cfg = DrafterConfig(hidden_size=H, vocab_size=V, target_layer_ids=[1, 2, 3], num_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, intermediate_size=48, block_size=block,
                        mask_token_id=MASK, rope_theta=10000.0, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with seeded(seed):
        return Drafter(cfg, torch.randn(V, H, generator=g), torch.randn(V, H, generator=g) * 3).double()


def random_sample(seed, length=40, runs=((3, 14), (17, 25), (29, 40))):
    """Tokens of a tiny vocabulary (so drafts do match) with supervised runs; the last one is cut at the end."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(length, dtype=torch.bool)
    for a, b in runs:
        mask[a:b] = True
    return {"sample_id": seed, "input_ids": torch.randint(0, MASK, (length,), generator=g), "loss_mask": mask,
            "positions": torch.arange(length) * 2 + 3, "hidden": torch.randn(length, L, H, generator=g,
                                                                             dtype=torch.float64)}


def naive_draft(model, head_VH, sample, s, visible, mask_id, block, draft_ids=None):
    """One block drafted alone over the context < s: slots < len(visible) hold `visible` (target ids)."""
    ids = torch.tensor(list(visible) + [mask_id] * (block - len(visible)))[None]
    pos = sample["positions"]
    h = model(sample["hidden"][None, :s], pos[None, :s], ids, (pos[s] + torch.arange(block))[None], mask=None)
    head = head_VH if draft_ids is None else head_VH[draft_ids]
    probs = (h[0, 1:] @ head.T).softmax(-1)
    conf, tok = probs.max(-1)
    return (tok if draft_ids is None else draft_ids[tok]).tolist(), conf.tolist()


def naive_match(tokens, sample, s, end):
    a = 0
    for k, t in enumerate(tokens, start=1):
        if s + k >= end or t != int(sample["input_ids"][s + k]):
            break
        a += 1
    return a


def naive_replay(model, sample, block, draft_ids=None, vp=None, k=4):
    """Per cycle: draft the block at s alone; with a VP drafter also draft its branches from the first draft's
    own tokens (not the sample's); accept the longest match, commit a + 1 within the turn, move on."""
    mask = sample["loss_mask"].tolist()
    runs, rows = [], []
    for t, m in enumerate(mask):
        if m and (t == 0 or not mask[t - 1]):
            runs.append([t, t + 1])
        elif m:
            runs[-1][1] = t + 1
    for n, (start, end) in enumerate(runs):
        s = start
        while s < end - 1:
            first, conf = naive_draft(model, model.lm_head_VH, sample, s, [int(sample["input_ids"][s])], MASK, block,
                                      draft_ids)
            a = naive_match(first, sample, s, end)
            if vp is not None:
                r = {}
                for i in range(1, block):
                    r[i] = float(np.prod(conf[:i - 1])) * (1 - conf[i - 1])
                for i in sorted(r, key=lambda i: -r[i])[:k]:
                    visible = [int(sample["input_ids"][s])] + first[:i - 1]
                    vp_tok, _ = naive_draft(vp, vp.lm_head_VH, sample, s, visible, MASK, block)
                    a = max(a, naive_match(first[:i - 1] + vp_tok[i - 1:], sample, s, end))
            rows.append((s, a, min(a + 1, end - 1 - s), n == len(runs) - 1))
            s += a + 1
    return rows


def rows_of(c: Cycles):
    return list(zip(c.anchor.tolist(), c.accepted.tolist(), c.committed.tolist(), c.last_turn.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_replay_equals_naive_per_cycle_loop(seed):
    model = tiny_drafter(seed, partial_rotary_factor=0.5)
    sample = random_sample(seed)
    drafting = GreedyDrafter.of(model, model.lm_head_VH, BLOCK, MASK)
    drafting.rows = 3 * BLOCK  # several passes per sample
    got = replay_sample(drafting, sample)["dflash"]
    want = naive_replay(model, sample, BLOCK)
    assert rows_of(got) == want
    assert got.accepted.max() >= 1  # the small token range makes some drafts match: the test can see a(s)
    # Every span is covered once: committed tokens sum to the span lengths minus their prefill token.
    assert got.committed.sum() == sum(e - 1 - a for a, e in spans(sample["loss_mask"]))
    assert set(got.last_turn[got.anchor >= 29]) == {True} and not got.last_turn[got.anchor < 29].any()


def test_reduced_draft_vocabulary_maps_draft_ids_to_target_ids():
    model = tiny_drafter(3)
    sample = random_sample(3)
    draft_ids = torch.tensor([0, 1, 2, 4, 5, 6])  # 3 is missing: it can never be accepted
    drafting = GreedyDrafter.of(model, model.lm_head_VH, BLOCK, MASK, draft_ids=draft_ids)
    got = replay_sample(drafting, sample)["dflash"]
    assert rows_of(got) == naive_replay(model, sample, BLOCK, draft_ids=draft_ids)
    tokens, _ = drafting.draft(sample, torch.arange(3, 13), torch.ones(10, dtype=torch.long))
    assert set(tokens.flatten().tolist()) <= set(draft_ids.tolist())


@pytest.mark.parametrize("seed, k", [(0, 4), (1, 1), (2, 3)])
def test_d2sd_equals_naive_branches_and_never_accepts_less_at_an_anchor(seed, k):
    dflash, vp = tiny_drafter(seed), tiny_drafter(seed + 10)
    sample = random_sample(seed)
    d, v = GreedyDrafter.of(dflash, dflash.lm_head_VH, BLOCK, MASK), GreedyDrafter.of(vp, vp.lm_head_VH, BLOCK, MASK)
    got = replay_sample(d, sample, v, k)
    assert rows_of(got["d2sd"]) == naive_replay(dflash, sample, BLOCK, vp=vp, k=k)
    assert rows_of(got["dflash"]) == naive_replay(dflash, sample, BLOCK)
    _, anchors, acc = accepted_lengths(d, sample, v, k)
    assert (acc["d2sd"] >= acc["dflash"]).all()
    assert (acc["d2sd"] > acc["dflash"]).any()  # some branch wins somewhere, so the branches are exercised


def test_d2sd_refuses_drafters_of_different_block_sizes():
    d, v = tiny_drafter(0), tiny_drafter(1, block=BLOCK + 1)
    with pytest.raises(ValueError, match="block sizes"):
        replay_sample(GreedyDrafter.of(d, d.lm_head_VH, BLOCK, MASK), random_sample(0),
                      GreedyDrafter.of(v, v.lm_head_VH, BLOCK + 1, MASK))


def test_branch_points_rank_likely_first_rejections():
    conf = torch.tensor([[0.9, 0.5, 0.99, 0.2], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    # r = [0.1, 0.45, 0.0045, 0.3564]; an all-certain draft ties at 0 and keeps the lower slots.
    assert branch_points(conf, 2).tolist() == [[2, 4], [1, 2]]
    assert branch_points(conf, 9).shape == (2, 4)


def oracle_cycles(sample_spans, ids, block, right: bool):
    anchors = torch.tensor([s for a, e in sample_spans for s in range(a, e - 1)])
    ends = torch.tensor([e for a, e in sample_spans for _ in range(a, e - 1)])
    idx = (anchors[:, None] + 1 + torch.arange(block - 1)).clamp_max(len(ids) - 1)
    tokens = ids[idx] if right else ids[idx] + 1
    return walk(dict(zip(anchors.tolist(), matched(tokens, ids, anchors, ends).tolist())), sample_spans)


def test_always_right_and_always_wrong_drafts_by_hand():
    ids = torch.arange(30)
    sample_spans = [(2, 12), (20, 30)]  # the last span is cut by the sample's end
    right = oracle_cycles(sample_spans, ids, BLOCK, right=True)
    # Span (2, 12): anchors 2, 6, 10 accept 3, 3, 1 (slot 2 would be past the end-of-turn token at 11) and commit
    # 4, 4, 1 (no bonus token past the turn's end); span (20, 30) likewise from 20.
    assert rows_of(right) == [(2, 3, 4, False), (6, 3, 4, False), (10, 1, 1, False),
                              (20, 3, 4, True), (24, 3, 4, True), (28, 1, 1, True)]
    wrong = oracle_cycles(sample_spans, ids, BLOCK, right=False)
    assert wrong.accepted.sum() == 0 and wrong.committed.tolist() == [1] * 18
    records = [{"images": True, "dflash": right}, {"images": False, "dflash": wrong}]
    fig = replay_figures(records, BLOCK)
    assert fig["all"]["tau"] == pytest.approx((18 + 18) / (6 + 18))
    assert fig["all"]["tau_per_sample"] == pytest.approx((3.0 + 1.0) / 2)
    assert fig["images"]["tau"] == 3.0 and fig["text_only"]["tau"] == 1.0
    assert fig["last_turn"]["cycles"] == 3 + 9 and fig["history"]["committed"] == 9 + 9
    assert fig["images"]["accept_per_slot"] == pytest.approx([1.0, 4 / 6, 4 / 6])
    assert fig["all"]["accepted_hist"] == [18, 2, 0, 4]
    empty = replay_figures([{"images": False, "dflash": wrong}], BLOCK)["images"]
    assert empty["tau"] is None and empty["cycles"] == 0


def test_spans_are_maximal_supervised_runs():
    assert spans(np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)) == [(0, 2), (4, 5), (6, 9)]
    assert spans(np.zeros(5, dtype=bool)) == []
    # A one-token span (an end-of-turn token alone) has nothing to draft: no cycle.
    sample = random_sample(0, length=12, runs=((2, 3), (5, 9)))
    d = GreedyDrafter.of(tiny_drafter(0), tiny_drafter(0).lm_head_VH, BLOCK, MASK)
    assert replay_sample(d, sample)["dflash"].anchor.min() == 5


# --- the CLI on a cache written through the cache writer, with drafters trained on it --------------------------

def train_run(url, run_dir, mode):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["setup=tiny", f"data.cache={url}", "drafter.mask_token_id=63",
                                          "drafter.block_size=4", f"objective.mode={mode}", "optim.max_steps=40",
                                          "optim.lr=1e-2", "eval_every=20", "save_every=0", "progress=false",
                                          "log_every=20"])
    cfg.run_dir = str(run_dir)
    train(OmegaConf.to_object(cfg))
    return run_dir / "checkpoints" / "step-00000040"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    url = counting_cache(root)
    return url, train_run(url, root / "dflash", "dflash"), train_run(url, root / "vp", "vp")


def logged_replay_taus(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/tau_replay"] for r in rows if "eval/tau_replay" in r}


def test_cli_writes_table_json_and_png_for_dflash_and_d2sd(runs, tmp_path, capsys):
    url, ckpt, vp = runs
    evaluate_main([str(ckpt), "--vp", str(vp.parents[1]), "--k", "2", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    # Training logged the same replay of the same held-out samples (all 6 <= 16) at each evaluation.
    taus = logged_replay_taus(ckpt.parents[1])
    assert sorted(taus) == [20, 40] and taus[40] == pytest.approx(result["dflash"]["all"]["tau"], abs=1e-12)
    # The counting sequences are learnable: the replay sees it, and the VP branches add to it.
    assert result["dflash"]["all"]["tau"] > 1.3 and result["d2sd"]["all"]["tau"] > result["dflash"]["all"]["tau"]
    assert (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert result["shards"] == ["shard-001"] and result["samples"] == 6  # the run's held-out shard by default
    for method in ("dflash", "d2sd"):
        fig = result[method]
        assert fig["all"]["cycles"] == fig["last_turn"]["cycles"] + fig["history"]["cycles"]
        assert fig["all"]["cycles"] == fig["images"]["cycles"] + fig["text_only"]["cycles"]
        assert fig["all"]["tau"] == pytest.approx(fig["all"]["committed"] / fig["all"]["cycles"])
        assert f"{method:7} all" in printed
    assert result["dflash"]["images"]["samples"] == result["dflash"]["text_only"]["samples"] == 3
    assert result["d2sd"]["all"]["committed"] == result["dflash"]["all"]["committed"]
    per = result["per_sample"]
    assert sum(p["dflash"]["cycles"] for p in per) == result["dflash"]["all"]["cycles"]
    assert [p["key"] for p in per] == [f"s1{i}" for i in range(6)]
    assert result["vp"] == str(vp)  # a run directory stands for its latest checkpoint
    evaluate_main([str(ckpt), "--shards", "shard-000", "--max-samples", "2", "--out", str(tmp_path / "b"),
                   "--no-progress"])
    again = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert again["shards"] == ["shard-000"] and again["samples"] == 2 and "d2sd" not in again
    assert result["position_source"] == "sequential"  # as trained
    evaluate_main([str(ckpt), "--position-source", "mrope_axis0", "--out", str(tmp_path / "c"), "--no-progress"])
    served = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert served["position_source"] == "mrope_axis0" and served["samples"] == 6
    with pytest.raises(ValueError, match="--position-source='mixed'"):  # training only: no runner feeds a mix
        evaluate_checkpoint(ckpt, position_source="mixed", out=tmp_path / "d", progress=False)


@pytest.mark.parametrize("args, message", [(["--shards", "shard-009"], "shard-009"), (["--k", "0"], "--k"),
                                           (["--max-samples", "0"], "--max-samples")])
def test_cli_refuses_bad_arguments_naming_them(runs, tmp_path, args, message):
    url, ckpt, _ = runs
    with pytest.raises(ValueError, match=message):
        evaluate_main([str(ckpt), "--out", str(tmp_path), "--no-progress", *args])


def test_cli_judges_on_another_storage_of_the_target_but_refuses_another_target(runs, tmp_path):
    url, ckpt, _ = runs
    fp8 = counting_cache(tmp_path / "fp8", hidden_dtype="fp8_e4m3")
    result = evaluate_checkpoint(ckpt, cache=fp8, out=tmp_path / "fp8-eval", progress=False)
    bf16 = evaluate_checkpoint(ckpt, cache=url, out=tmp_path / "bf16-eval", progress=False)
    assert result["cache"] == fp8 and result["shards"] == bf16["shards"] and result["samples"] == bf16["samples"] == 6
    # Same tokens and spans: every supervised token but each span's first is committed, whatever was accepted.
    assert result["dflash"]["all"]["committed"] == bf16["dflash"]["all"]["committed"] > 0
    other = counting_cache(tmp_path / "other", name="another-target")
    with pytest.raises(ValueError, match="target.name_or_path"):
        evaluate_checkpoint(ckpt, cache=other, out=tmp_path / "other-eval", progress=False)
