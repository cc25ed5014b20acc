"""DFlash2 (grouped dynamic convolutions, candidate selector) and D-PACE against naive code and against the public
reference (speculators 0.9.0, installed by `make setup` without its dependencies): float64, shared weights."""

import math

import pytest
import torch

from helpers import seeded
from test_train_objective import BLOCK, MASK, V, drafter, make_batch, tiny_cfg
from train.attention import build_mask
from train.config import ObjectiveConfig, validate_architecture
from train.dflash2 import GroupedDynamicConv
from train.model import Drafter
from train.objective import Objective, dpace_weights
from train.replay import GreedyDrafter

H = 32


@pytest.fixture(autouse=True)
def _seeded():
    """Random inputs from a fixed seed; the global RNG is left as it was."""
    with seeded(0):
        yield


def dflash2(seed=0, scramble=True, **kw):
    """A float64 DFlash2 drafter; `scramble` moves its convolutions and successor codebook off their no-op start."""
    cfg = dict(architecture="dflash2", conv_kernel_size=3, conv_group_size=8, selector_rank=6, selector_top_k=5)
    model = drafter(seed, **{**cfg, **kw})
    if scramble:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "conv" in name or "selector" in name:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if "conv" in name else 1.0))
    return model


def naive_conv(x_BQH, base_TH, delta_BQTG, block, group):
    out = torch.zeros_like(x_BQH)
    B, Q, Hd = x_BQH.shape
    for b in range(B):
        for i in range(Q):
            for t in range(base_TH.shape[0]):
                if i % block >= t:
                    for c in range(Hd):
                        out[b, i, c] += (base_TH[t, c] + delta_BQTG[b, i, t, c // group]) * x_BQH[b, i - t, c]
    return out


def test_convolution_equals_the_formula_and_starts_as_a_no_op():
    conv = GroupedDynamicConv(16, block=4, taps=3, group=4).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    y, delta = conv.prepare(x)
    assert torch.equal(y, x) and torch.equal(conv.finish(x * 2, delta), x * 2)  # identity, zero projection
    with torch.no_grad():
        conv.base_kernel.normal_()
        conv.kernel_projection.weight.normal_()
    y, delta = conv.prepare(x)
    raw = conv.kernel_projection(x).view(2, 12, 2, 3, 4)
    torch.testing.assert_close(y, naive_conv(x, conv.base_kernel[0], raw[:, :, 0], 4, 4))
    z = torch.randn_like(x)
    torch.testing.assert_close(conv.finish(z, delta), naive_conv(z, conv.base_kernel[1], raw[:, :, 1], 4, 4))
    # Never across a block: changing block 0 leaves blocks 1 and 2 as they were.
    x2 = x.clone()
    x2[:, :4] += 1
    assert torch.equal(conv.prepare(x2)[0][:, 4:], conv.prepare(x)[0][:, 4:])


def test_fresh_dflash2_equals_dflash_and_selector_keeps_the_unary_order():
    """A new DFlash2 drafter computes what a DFlash one with the same backbone weights computes, and its selector
    path is each slot's argmax."""
    v2, v1 = dflash2(scramble=False), drafter(0)
    v1.load_state_dict({k: v for k, v in v2.state_dict().items() if k in v1.state_dict()})
    ids, mask, pos, hidden, lens = make_batch([20], seed=3)
    sample = {"input_ids": ids[0], "positions": pos[0], "hidden": hidden[0].double()}
    anchors = torch.tensor([2, 6, 9])
    got = [GreedyDrafter.of(m, m.lm_head_VH, BLOCK, MASK).draft(sample, anchors, torch.ones(3, dtype=torch.long))
           for m in (v2, v1)]
    assert torch.equal(got[0][0], got[1][0])


def reference_greedy(model: Drafter, h_NKH, anchor_N):
    """The selector's greedy walk step by step, as the engines run it: each slot's unary top-k, scored after the
    previous slot's choice (the anchor first)."""
    sel, tokens = model.candidate_selector, []
    prev = anchor_N
    h_NKH = h_NKH.detach()
    model = model.requires_grad_(False)
    for k in range(h_NKH.shape[1]):
        logits = model.shape_logits(h_NKH[:, k] @ model.lm_head_VH.T).detach()
        top, cand = logits.topk(sel.top_k)
        best = []
        for n in range(h_NKH.shape[0]):
            scores = [float(top[n, c]) + float((sel.predecessor_codebook[prev[n]] * (sel.hidden_projection.weight
                      @ h_NKH[n, k]) * sel.successor_codebook[cand[n, c]]).sum()) for c in range(sel.top_k)]
            best.append(int(cand[n, max(range(sel.top_k), key=lambda c: (scores[c], -c))]))
        prev = torch.tensor(best)
        tokens.append(prev)
    return torch.stack(tokens, 1)


@pytest.mark.parametrize("multiplier, softcap", [(1.0, None), (0.3, 2.0)])
def test_greedy_path_equals_a_naive_walk(multiplier, softcap):
    model = dflash2(output_multiplier=multiplier, final_logit_softcapping=softcap)
    h = torch.randn(6, BLOCK, H, dtype=torch.float64) * 2
    ids = torch.full((6, BLOCK), MASK)
    ids[:, 0] = torch.arange(6) * 7
    drafting = GreedyDrafter.of(model, model.lm_head_VH, BLOCK, MASK)
    tokens, conf = drafting.pick(h, ids, torch.ones(6, dtype=torch.long))
    assert torch.equal(tokens, reference_greedy(model, h[:, 1:], ids[:, 0]))
    assert ((conf > 0) & (conf <= 1)).all()
    unary, _ = GreedyDrafter(model, drafting.head_VH, None, BLOCK, MASK, use_selector=False).pick(
        h, ids, torch.ones(6, dtype=torch.long))
    assert not torch.equal(unary, tokens)  # the selector changes the path here: the comparison can fail


def test_visible_prefix_feeds_the_walk_its_own_tokens():
    """VP drafting: slots < p hold real tokens, and the slot after them takes the last one as predecessor."""
    model = dflash2(seed=2)
    h = torch.randn(3, BLOCK, H, dtype=torch.float64) * 2
    ids = torch.full((3, BLOCK), MASK)
    ids[:, :3] = torch.tensor([[4, 9, 11], [5, 10, 12], [6, 13, 14]])
    drafting = GreedyDrafter.of(model, model.lm_head_VH, BLOCK, MASK)
    tokens, _ = drafting.pick(h, ids, torch.full((3,), 3))
    # From slot 3 on, the walk is the one started at slot 3 with slot 2's real token as its anchor.
    assert torch.equal(tokens[:, 2:], reference_greedy(model, h[:, 3:], ids[:, 2]))


def test_dpace_weights_equal_a_per_slot_loop():
    ce = torch.rand(3, 4, 6, dtype=torch.float64) * 3
    scored = torch.rand(3, 4, 6) < 0.7
    scored[..., 0] = False
    w = dpace_weights(ce, scored, 0.5)
    for b in range(3):
        for j in range(4):
            s = [((1 - 0.5) * math.exp(-float(ce[b, j, i])) + 0.5) if scored[b, j, i] else 1.0 for i in range(6)]
            reach = [math.prod(s[:i + 1]) * bool(scored[b, j, i]) for i in range(6)]
            for k in range(6):
                want = sum(reach[k:]) if scored[b, j, k] else 0.0
                assert float(w[b, j, k]) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mode", ["dflash", "vp"])
def test_dpace_loss_restarts_at_the_first_masked_slot_and_normalises_by_weight(mode):
    model = drafter(seed=4)
    ids, mask, pos, hidden, lens = make_batch([26, 19], seed=8)
    batch = {"input_ids": ids, "loss_mask": mask, "positions": pos, "hidden": hidden.double(), "lengths": lens,
             "sample_ids": torch.tensor([1, 2])}
    objective = Objective(ObjectiveConfig(mode=mode, weighting="dpace", num_anchors=6), block_size=BLOCK,
                          mask_id=MASK, head_VH=model.lm_head_VH)
    blocks = objective.blocks(batch, step=2)
    loss, stats = objective.loss(model, batch, blocks)
    h = model(batch["hidden"], pos, blocks.ids_BQ, blocks.pos_BQ, build_mask(blocks.anchors_BN, lens, ids.shape[1],
                                                                               BLOCK, "dense"))
    ce = torch.nn.functional.cross_entropy((h @ model.lm_head_VH.T).flatten(0, 1), blocks.labels_BQ.flatten(),
                                           reduction="none").view_as(blocks.labels_BQ)
    scored = blocks.weights_BQ > 0
    B, N = blocks.anchors_BN.shape
    w = dpace_weights((ce * scored).view(B, N, BLOCK).detach(), scored.view(B, N, BLOCK), 0.5).flatten(1)
    torch.testing.assert_close(loss, (w * ce).sum())
    torch.testing.assert_close(stats["weight"], w.sum().double())
    prefix = blocks.prefix_BN.repeat_interleave(BLOCK, 1)
    slot = torch.arange(B * N * BLOCK).view(B, -1) % BLOCK
    assert (w[slot < prefix] == 0).all() and (w[scored] > 0).all()
    if mode == "vp":
        assert (blocks.prefix_BN[blocks.keep_BN] > 1).all()


def test_selector_loss_is_strict_top_k_and_reports_recall():
    """The selector's cross-entropy counts only slots whose gold token is among the unary top-k, and equals a naive
    per-slot computation there; recall is the share of scored slots with gold in the set."""
    model = dflash2(seed=5, selector_top_k=40)
    ids, mask, pos, hidden, lens = make_batch([30], seed=9)
    batch = {"input_ids": ids, "loss_mask": mask, "positions": pos, "hidden": hidden.double(), "lengths": lens,
             "sample_ids": torch.tensor([0])}
    objective = Objective(ObjectiveConfig(num_anchors=8, gamma=4.0), block_size=BLOCK, mask_id=MASK,
                          head_VH=model.lm_head_VH)
    blocks = objective.blocks(batch, step=0)
    total, stats = objective.loss(model, batch, blocks)
    with torch.no_grad():
        h = model(batch["hidden"], pos, blocks.ids_BQ, blocks.pos_BQ,
                  build_mask(blocks.anchors_BN, lens, ids.shape[1], BLOCK, "dense"))
    sel, want, hits, scored_n = model.candidate_selector, 0.0, 0, 0
    for q in range(blocks.ids_BQ.shape[1]):
        w = float(blocks.weights_BQ[0, q])
        if w == 0:
            continue
        scored_n += 1
        logits = h[0, q] @ model.lm_head_VH.T
        top, cand = logits.topk(40)
        gold, prev = int(blocks.labels_BQ[0, q]), int(blocks.prev_BQ[0, q])
        assert prev == int(ids[0, int(blocks.anchors_BN[0, q // BLOCK]) + q % BLOCK - 1])  # teacher forced
        if gold not in cand.tolist():
            continue
        hits += 1
        scores = top + (sel.predecessor_codebook[prev] * sel.hidden_projection(h[0, q]) *
                        sel.successor_codebook[cand]).sum(-1)
        want += w * float(torch.nn.functional.cross_entropy(scores[None].detach(),
                                                            torch.tensor([cand.tolist().index(gold)])))
    assert 0 < hits < scored_n  # some gold tokens fall outside the set: the test sees the rule
    assert float(stats["selector_loss_sum"]) == pytest.approx(want, rel=1e-9)
    assert float(stats["candidate_hits"]) == hits and float(stats["candidate_scored"]) == scored_n
    assert float(total.detach()) == pytest.approx(float(stats["loss_sum"]) + want, rel=1e-9)


def test_selector_weight_schedule_and_stop_gradient():
    cfg = ObjectiveConfig(selector_alpha=2.0, selector_warmup=0.1, selector_ramp=0.2)
    obj = Objective(cfg, block_size=BLOCK, mask_id=MASK, head_VH=torch.zeros(V, H), total_steps=100)
    assert [obj.selector_weight(s) for s in (0, 9, 10, 20, 30, 99, None)] == [0, 0, 0, 1.0, 2.0, 2.0, 2.0]
    ids, mask, pos, hidden, lens = make_batch([24], seed=2)
    batch = {"input_ids": ids, "loss_mask": mask, "positions": pos, "hidden": hidden.double(), "lengths": lens,
             "sample_ids": torch.tensor([0])}
    grads = {}
    for name, kw in (("coupled", {}), ("stopped", dict(selector_stop_gradient=True)), ("off", dict(selector_alpha=0))):
        model = dflash2(seed=1, selector_top_k=40)  # wide enough that gold tokens fall in the set
        objective = Objective(ObjectiveConfig(num_anchors=6, **kw), block_size=BLOCK, mask_id=MASK,
                              head_VH=model.lm_head_VH)
        total, _ = objective.loss(model, batch, objective.blocks(batch, 0))
        total.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    backbone = [n for n in grads["off"] if not n.startswith("candidate_selector")]
    # Stopped: the backbone learns only from the unary loss, as with the selector off; the selector still learns.
    for n in backbone:
        torch.testing.assert_close(grads["stopped"][n], grads["off"][n], rtol=1e-12, atol=1e-14)
    assert any(not torch.allclose(grads["coupled"][n], grads["off"][n]) for n in backbone)
    assert grads["off"]["candidate_selector.successor_codebook"] is None
    assert grads["stopped"]["candidate_selector.successor_codebook"].abs().sum() > 0


def test_config_refuses_what_dflash2_cannot_be():
    base = tiny_cfg(architecture="dflash2", conv_kernel_size=2, conv_group_size=8, selector_rank=4, selector_top_k=4)
    validate_architecture(base, vocab_size=V, draft_vocab_size=10)
    for change, key in ((dict(conv_kernel_size=BLOCK + 1), "conv_kernel_size"), (dict(conv_group_size=5), "group"),
                        (dict(selector_top_k=V + 1), "selector_top_k"), (dict(selector_top_k=0), "selector_top_k"),
                        (dict(selector_rank=0), "selector_rank"), (dict(final_logit_softcapping=-1.0), "softcap")):
        with pytest.raises(ValueError, match=key):
            validate_architecture(base.__class__(**{**base.__dict__, **change}), vocab_size=V)
    with pytest.raises(ValueError, match="draft vocabulary"):
        validate_architecture(base.__class__(**{**base.__dict__, "selector_top_k": 11}), V, draft_vocab_size=10)
    with pytest.raises(ValueError, match="architecture=dflash2"):
        validate_architecture(tiny_cfg(output_multiplier=0.5), vocab_size=V)


def test_reduced_vocabulary_maps_candidates_to_target_ids_for_the_codebooks():
    """Top-k runs over the draft vocabulary; its ids are mapped to target ids before the codebooks (indexed by
    target id over the whole vocabulary) and before they are drafted."""
    draft_ids = torch.tensor(sorted(set(range(0, V, 3)) | {MASK}))
    model = dflash2(seed=6)
    drafting = GreedyDrafter.of(model, model.lm_head_VH, BLOCK, MASK, draft_ids=draft_ids)
    h = torch.randn(4, BLOCK, H, dtype=torch.float64) * 2
    ids = torch.full((4, BLOCK), MASK)
    ids[:, 0] = torch.tensor([1, 2, 4, 5])  # anchors outside the draft vocabulary still index the codebook
    tokens, _ = drafting.pick(h, ids, torch.ones(4, dtype=torch.long))
    assert set(tokens.flatten().tolist()) <= set(draft_ids.tolist())
    # The same walk over a head that is zero outside the draft vocabulary's rows, pushed down: equal.
    full = model.lm_head_VH.clone()
    outside = torch.ones(V, dtype=torch.bool)
    outside[draft_ids] = False
    with torch.no_grad():
        model.lm_head_VH[outside] = 0
        bias = torch.zeros(V, dtype=torch.float64)
        bias[outside] = -1e9
        orig = model.shape_logits
        model.shape_logits = lambda logits: orig(logits) + bias
        try:
            assert torch.equal(reference_greedy(model, h[:, 1:], ids[:, 0]), tokens)
        finally:
            del model.shape_logits
            model.lm_head_VH.copy_(full)
