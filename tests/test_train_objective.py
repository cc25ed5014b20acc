"""The drafter and objective against naive per-block and per-slot reference code."""

import math

import pytest
import torch

from helpers import seeded
from train.attention import build_mask
from train.config import DrafterConfig, ObjectiveConfig
from train.model import Drafter
from train.config import resolve_gamma
from train.metrics import add_sums, step_metrics
from train.objective import Blocks, Objective, block_stats, draft_vocab, make_blocks, sample_anchors, sample_prefix

V, H, L, BLOCK, MASK = 97, 32, 3, 4, 96


def tiny_cfg(**kw):
    base = dict(hidden_size=H, vocab_size=V, target_layer_ids=[1, 2, 3], num_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, intermediate_size=48, block_size=BLOCK, mask_token_id=MASK,
                rope_theta=10000.0)
    base.update(kw)
    return DrafterConfig(**base)


def make_batch(lengths, seed=0, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    T = pad_to or max(lengths)
    B = len(lengths)
    ids = torch.randint(0, V - 1, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    pos = torch.arange(T).expand(B, T) * 2 + 5  # not 0..T-1, so the position source matters
    hidden = torch.randn(B, T, L, H, generator=g)
    lens = torch.tensor(lengths)
    valid = torch.arange(T)[None] < lens[:, None]
    return ids * valid, mask & valid, pos.clone(), hidden * valid[..., None, None], lens


def drafter(seed=0, **kw):
    g = torch.Generator().manual_seed(seed + 1)
    with seeded(seed):
        return Drafter(tiny_cfg(**kw), torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)).double()


@pytest.mark.parametrize("mode", ["dflash", "vp"])
def test_batched_blocks_equal_each_block_run_alone(mode):
    model = drafter(partial_rotary_factor=0.5)
    ids, mask, pos, hidden, lens = make_batch([23, 15, 9])
    hidden = hidden.double()
    sids = torch.tensor([3, 8, 1])
    anchors, keep = sample_anchors(mask, lens, sids, num_anchors=5, seed=0, step=0)
    prefix = sample_prefix(keep, sids, 0, 0, BLOCK, 0.9, mode)
    blocks = make_blocks(ids, pos, mask, lens, anchors, keep, prefix, BLOCK, MASK, gamma=4.0)
    attn_mask = build_mask(anchors, lens, ids.shape[1], BLOCK, "dense")
    out = model(hidden, pos, blocks.ids_BQ, blocks.pos_BQ, attn_mask)
    checked = 0
    for b in range(ids.shape[0]):
        for j in range(anchors.shape[1]):
            if not keep[b, j]:
                continue
            a = int(anchors[b, j])
            sl = slice(j * BLOCK, (j + 1) * BLOCK)
            ref = model(hidden[b:b + 1, :a], pos[b:b + 1, :a], blocks.ids_BQ[b:b + 1, sl], blocks.pos_BQ[b:b + 1, sl],
                        mask=None)
            torch.testing.assert_close(out[b:b + 1, sl], ref, rtol=1e-9, atol=1e-9)
            checked += 1
    assert checked >= 8


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_dense_mask():
    model = drafter().float()
    ids, mask, pos, hidden, lens = make_batch([40, 33], seed=2, pad_to=48)
    sids = torch.tensor([0, 1])
    anchors, keep = sample_anchors(mask, lens, sids, 6, 0, 0)
    blocks = make_blocks(ids, pos, mask, lens, anchors, keep, sample_prefix(keep, sids, 0, 0, BLOCK, 0.9, "dflash"),
                         BLOCK, MASK, 4.0)
    outs = {}
    for backend in ("dense", "flex"):
        m = build_mask(anchors, lens, ids.shape[1], BLOCK, backend)
        with torch.no_grad():  # flex has no CPU backward; the GPU run covers training through it
            outs[backend] = model(hidden, pos, blocks.ids_BQ, blocks.pos_BQ, m, backend=backend)
    torch.testing.assert_close(outs["flex"], outs["dense"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, base", [("dflash", 0.9), ("vp", 0.9), ("vp", 0.5)])
def test_blocks_labels_weights_equal_per_slot_loop(mode, base):
    ids, mask, pos, _, lens = make_batch([30, 12, 21], seed=4)
    sids = torch.tensor([5, 6, 7])
    block, gamma = 6, 5.0
    anchors, keep = sample_anchors(mask, lens, sids, 7, seed=1, step=3)
    prefix = sample_prefix(keep, sids, 1, 3, block, base, mode)
    got = make_blocks(ids, pos, mask, lens, anchors, keep, prefix, block, MASK, gamma)
    B, N = anchors.shape
    for b in range(B):
        for j in range(N):
            a, p = int(anchors[b, j]), int(prefix[b, j])
            assert (p == 1) if mode == "dflash" else (2 <= p <= block - 1)
            if keep[b, j]:
                assert mask[b, a] and mask[b, a + 1] and a + 1 < lens[b]
            for k in range(block):
                q = j * block + k
                inside = a + k < lens[b]
                want_id = int(ids[b, a + k]) if (k < p and inside) else MASK
                want_w = 0.0
                if keep[b, j] and inside and k >= p and mask[b, a + k]:
                    want_w = math.exp(-(k - p) / gamma)
                assert int(got.ids_BQ[b, q]) == want_id
                assert int(got.pos_BQ[b, q]) == int(pos[b, a]) + k
                assert got.weights_BQ[b, q].item() == pytest.approx(want_w, rel=1e-6)
                if inside:
                    assert int(got.labels_BQ[b, q]) == int(ids[b, a + k])  # same position, no shift
                if k == 0:
                    assert got.weights_BQ[b, q] == 0  # slot 0 is never a loss position


def test_vp_prefix_distribution_follows_base_power():
    keep = torch.ones(1, 20000, dtype=torch.bool)
    p = sample_prefix(keep, torch.tensor([0]), 0, 0, 8, 0.7, "vp")
    freq = torch.bincount(p.flatten(), minlength=8)[2:].double()
    want = 0.7 ** torch.arange(2, 8, dtype=torch.double)
    torch.testing.assert_close(freq / freq.sum(), want / want.sum(), atol=0.01, rtol=0)


def test_anchor_sampling_is_invariant_to_padding():
    ids, mask, pos, _, lens = make_batch([20, 14], seed=5)
    sids = torch.tensor([11, 12])
    a1, k1 = sample_anchors(mask, lens, sids, 4, 0, 7)
    pad = torch.zeros(2, 30, dtype=torch.bool)
    a2, k2 = sample_anchors(torch.cat([mask, pad], 1), lens, sids, 4, 0, 7)
    assert torch.equal(a1, a2) and torch.equal(k1, k2)
    one, keep_one = sample_anchors(mask[1:, :14], lens[1:], sids[1:], 4, 0, 7)
    assert torch.equal(one, a1[1:]) and torch.equal(keep_one, k1[1:])
    a3, _ = sample_anchors(mask, lens, sids, 4, 0, 8)
    assert not torch.equal(a1, a3)  # a new step draws new anchors


def test_anchors_need_a_supervised_next_position():
    # Two turns: the first ends at position 4 (its end-of-turn token), the second starts at 8.
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    anchors, keep = sample_anchors(mask, torch.tensor([12]), torch.tensor([0]), 12, seed=0, step=0)
    assert sorted(anchors[keep].tolist()) == [1, 2, 3, 8, 9]  # not 4 or 10: nothing supervised follows them


def test_gamma_null_picks_the_block_default_and_inf_turns_the_decay_off():
    assert resolve_gamma(None, 8) == 4.0 and resolve_gamma(None, 16) == 7.0 and resolve_gamma(2.5, 8) == 2.5
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="objective.gamma"):
            resolve_gamma(bad, 8)
    ids, mask, pos, _, lens = make_batch([30], seed=4)
    mask[:] = True
    sids = torch.tensor([0])
    anchors, keep = sample_anchors(mask, lens, sids, 3, 0, 0)
    prefix = sample_prefix(keep, sids, 0, 0, 6, 0.9, "dflash")
    flat = make_blocks(ids, pos, mask, lens, anchors, keep, prefix, 6, MASK, math.inf).weights_BQ.view(-1, 6)
    kept = flat[keep[0]]
    assert torch.equal(kept, (kept > 0).float()) and kept[:, 1:].sum() >= 3 * 5 - 4  # 1 wherever scored
    assert torch.equal(kept[:, 0], torch.zeros(len(kept)))


def _head_logits_loss(h, head, labels, weights):
    ce = torch.nn.functional.cross_entropy((h @ head.T).flatten(0, 1), labels.flatten(), reduction="none")
    return (ce * weights.flatten()).sum()


@pytest.mark.parametrize("vocab_size", [None, 12])
def test_chunked_loss_and_gradients_equal_unchunked(vocab_size):
    """The objective's chunked loss (full or draft vocabulary) against a direct cross-entropy over the whole
    (or the gathered draft) head, and its gradients against that reference's."""
    ids, mask, pos, hidden, lens = make_batch([25, 19], seed=6)
    batch = {"input_ids": ids, "loss_mask": mask, "positions": pos, "hidden": hidden.double(), "lengths": lens,
             "sample_ids": torch.tensor([0, 1])}
    draft_ids = draft_vocab(torch.bincount(ids[mask], minlength=V), vocab_size) if vocab_size else None
    results = []
    for chunk in (5, 10_000, None):
        model = drafter(seed=3)
        objective = Objective(ObjectiveConfig(gamma=4.0, num_anchors=6, loss_chunk_rows=chunk or 1), block_size=BLOCK,
                              mask_id=MASK, head_VH=model.lm_head_VH, draft_ids=draft_ids)
        blocks = objective.blocks(batch, step=0)
        if chunk is None:  # the reference: full logits, labels mapped by hand
            mask_ = build_mask(blocks.anchors_BN, lens, ids.shape[1], BLOCK, "dense")
            h = model(batch["hidden"], pos, blocks.ids_BQ, blocks.pos_BQ, mask_)
            raw = make_blocks(ids, pos, mask, lens, blocks.anchors_BN, blocks.keep_BN, blocks.prefix_BN, BLOCK,
                              MASK, 4.0)
            head, labels, weights = model.lm_head_VH, raw.labels_BQ, raw.weights_BQ
            if draft_ids is not None:
                lookup = {int(t): d for d, t in enumerate(draft_ids)}
                mapped = torch.tensor([lookup.get(int(t), -1) for t in labels.flatten()]).view_as(labels)
                head, weights, labels = head[draft_ids], weights * (mapped >= 0), mapped.clamp_min(0)
                assert (weights == 0).sum() > (raw.weights_BQ == 0).sum()  # some targets fall outside
            loss = _head_logits_loss(h, head, labels, weights)
        else:
            loss, _ = objective.loss(model, batch, blocks)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[:2]:
        torch.testing.assert_close(loss, results[2][0], rtol=1e-9, atol=1e-9)
        for a, b in zip(grads, results[2][1]):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_step_normalisation_makes_micro_batches_equal_one_batch():
    """Two micro-batches, each divided by the step's total weight, give the loss and gradients of the same
    samples in one batch (draws do not depend on the batch a sample lands in)."""
    ids, mask, pos, hidden, lens = make_batch([21, 9], seed=7)
    hidden = hidden.double()
    whole = {"input_ids": ids, "loss_mask": mask, "positions": pos, "hidden": hidden, "lengths": lens,
             "sample_ids": torch.tensor([4, 9])}
    parts = [{k: v[b:b + 1] for k, v in whole.items()} for b in range(2)]
    outcome = []
    for batches in ([whole], parts):
        model = drafter(seed=5)
        objective = Objective(ObjectiveConfig(num_anchors=5), block_size=BLOCK, mask_id=MASK, head_VH=model.lm_head_VH)
        blocks = [objective.blocks(b, step=3) for b in batches]
        total_weight = sum(b.weights_BQ.sum() for b in blocks)
        loss = sum(objective.loss(model, b, blk)[0] / total_weight for b, blk in zip(batches, blocks))
        loss.backward()
        outcome.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = outcome
    torch.testing.assert_close(l1, l2, rtol=1e-9, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    weights = [objective.blocks(b, 3).weights_BQ.sum() for b in parts]
    assert abs(float(weights[0]) - float(weights[1])) > 0.1  # unequal parts: a per-micro-batch mean would differ


def test_block_stats_count_leading_correct_slots_and_average_slots_over_scored_steps():
    anchors = torch.tensor([[0, 10]])
    keep = torch.tensor([[True, True]])
    prefix = torch.tensor([[1, 1]])
    weights = torch.ones(1, 8)
    blocks = Blocks(ids_BQ=None, pos_BQ=None, labels_BQ=None, weights_BQ=weights, prefix_BN=prefix, anchors_BN=anchors,
                    keep_BN=keep)
    correct = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)  # block 0 accepts 2, block 1 accepts 1
    one = {"loss_sum": torch.tensor(6.0), "weight": torch.tensor(3.0), "tokens": torch.tensor(8.0),
           **block_stats(correct, blocks, 4)}
    m = step_metrics(dict(one))
    assert m["acceptance_estimate"] == pytest.approx(((2 + 1) + (1 + 1)) / 2) and m["loss"] == 2.0
    assert m["acc_1"] == pytest.approx(1.0) and m["acc_2"] == pytest.approx(0.5) and m["acc_3"] == pytest.approx(0.5)
    # A second step that scores slot 3 nowhere: slot 3's accuracy stays the mean over the step that scored it.
    blocks.weights_BQ = torch.tensor([[1.0, 1, 1, 0, 1, 1, 1, 0]])
    two = {"loss_sum": torch.tensor(0.0), "weight": torch.tensor(1.0), "tokens": torch.tensor(8.0),
           **block_stats(torch.zeros(1, 8, dtype=torch.bool), blocks, 4)}
    m = step_metrics(add_sums(dict(one), two))
    assert m["acc_3"] == pytest.approx(0.5) and m["acc_1"] == pytest.approx(2 / 4)
    assert m["loss"] == pytest.approx(6.0 / 4.0)
