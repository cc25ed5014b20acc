"""The DFlash / VP training objective: anchors, blocks, same-position labels, decayed weights, chunked loss.

Block j of a sequence starts at anchor a_j: slot 0 holds input_ids[a_j] (the last verified token), slots
1..B-1 hold the mask id (VP: slots < p hold the real tokens) and slot k is trained to predict
input_ids[a_j + k] at position pos[a_j] + k, with weight keep_j * loss_mask[a_j+k] * exp(-(k-s)/gamma) for
k >= s, where s = 1 (DFlash) or p (VP). All randomness is a hash of (seed, step, sample, position), so a
batch's draws do not depend on its padding and a resumed run draws exactly what the first run would have.

`Objective` is the one place that turns a batch into a loss: the training loop, its evaluation, the benchmark
and the tests all call it. Losses are returned as weighted sums so the caller can normalise by the weight of
a whole optimizer step (every micro-batch on every rank), not by each micro-batch's own weight.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.attention import build_mask
from train.config import MODES, WEIGHTINGS, ObjectiveConfig, check_choice, resolve_gamma

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer hash (two multiply-xorshift rounds) on int64 tensors holding values < 2**32."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def uniform(seed: int, step: int, salt: int, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """Deterministic U[0, 1) draws [len(rows), cols] keyed by (seed, step, salt, row id, column)."""
    base = _mix(torch.tensor(((seed * 1_000_003 + step) * 31 + salt) & _M32, dtype=torch.int64))
    h = _mix(base ^ (rows.to(torch.int64) & _M32))[:, None]
    h = _mix(h ^ torch.arange(cols, dtype=torch.int64, device=rows.device))
    return h.double() / 2**32


def sample_anchors(loss_mask_BT, lengths_B, sample_ids_B, num_anchors: int, seed: int, step: int):
    """Up to `num_anchors` distinct anchors per sequence among supervised positions whose next position is
    supervised too: an anchor with nothing to predict (a turn's end-of-turn token) would waste a slot.

    Returns anchors [B, N] in increasing order and keep [B, N] (False where a sequence had fewer candidates).
    """
    B, T = loss_mask_BT.shape
    pos = torch.arange(T, device=loss_mask_BT.device)
    next_supervised = F.pad(loss_mask_BT[:, 1:], (0, 1), value=False)
    candidate = loss_mask_BT & next_supervised & (pos[None] + 1 < lengths_B[:, None])
    score = uniform(seed, step, 1, sample_ids_B, T).to(loss_mask_BT.device)
    score = torch.where(candidate, score, torch.full_like(score, -1.0))
    n = min(num_anchors, T)
    top, idx = score.topk(n, dim=1)
    keep = top >= 0
    idx = torch.where(keep, idx, torch.full_like(idx, T))  # invalid slots sort last
    anchors, order = idx.sort(dim=1)
    keep = keep.gather(1, order)
    return torch.where(keep, anchors, torch.zeros_like(anchors)), keep


def sample_prefix(keep_BN, sample_ids_B, seed: int, step: int, block: int, base: float, mode: str):
    """Visible prefix length per block: 1 for DFlash; VP draws p in [min(2, B-1), B-1] with P(p) ~ base**p."""
    check_choice("objective.mode", mode, MODES)
    if mode == "dflash":
        return torch.ones_like(keep_BN, dtype=torch.long)
    lo = min(2, block - 1)
    choices = torch.arange(lo, block, dtype=torch.float64)
    cdf = torch.cumsum(base ** choices, 0)
    cdf = cdf / cdf[-1]
    u = uniform(seed, step, 2, sample_ids_B, keep_BN.shape[1])
    return (lo + torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(len(choices) - 1)).to(keep_BN.device)


@dataclass
class Blocks:
    ids_BQ: torch.Tensor  # block input tokens, Q = N * block
    pos_BQ: torch.Tensor
    labels_BQ: torch.Tensor
    weights_BQ: torch.Tensor  # 0 where a slot is not a loss position
    prefix_BN: torch.Tensor
    anchors_BN: torch.Tensor
    keep_BN: torch.Tensor
    prev_BQ: torch.Tensor | None = None  # target id of each slot's previous token (the anchor's for slot 1)


def _slots(anchors_BN, lengths_B, block: int):
    """Absolute positions [B, N, block] of every block slot and whether each lies inside its sequence."""
    idx_BNK = anchors_BN[..., None] + torch.arange(block, device=anchors_BN.device)
    return idx_BNK, idx_BNK < lengths_B[:, None, None]


def block_inputs(input_ids_BT, positions_BT, lengths_B, anchors_BN, prefix_BN, block: int, mask_id: int):
    """What the drafter is fed and asked: block input ids [B, Q] (slots < prefix the sequence's tokens, the rest
    the mask id), their positions pos[a] + k [B, Q] and the same-position labels input_ids[a + k] [B, Q]."""
    B, N = anchors_BN.shape
    idx_BNK, valid = _slots(anchors_BN, lengths_B, block)
    flat = idx_BNK.clamp_max(input_ids_BT.shape[1] - 1).flatten(1)
    tokens = input_ids_BT.gather(1, flat).view(B, N, block)
    k = torch.arange(block, device=anchors_BN.device)
    visible = (k < prefix_BN[..., None]) & valid
    ids = torch.where(visible, tokens, torch.full_like(tokens, mask_id))
    pos = positions_BT.gather(1, anchors_BN)[..., None] + k
    return ids.flatten(1), pos.flatten(1), tokens.flatten(1)


def block_weights(loss_mask_BT, lengths_B, anchors_BN, keep_BN, prefix_BN, block: int, gamma: float):
    """Loss weight of every slot [B, Q]: keep_j * loss_mask[a_j + k] * [k >= p] * exp(-(k - p) / gamma)."""
    B, N = anchors_BN.shape
    idx_BNK, valid = _slots(anchors_BN, lengths_B, block)
    flat = idx_BNK.clamp_max(loss_mask_BT.shape[1] - 1).flatten(1)
    supervised = loss_mask_BT.gather(1, flat).view(B, N, block) & valid
    k = torch.arange(block, device=anchors_BN.device)
    p = prefix_BN[..., None]
    decay = torch.exp(-(k - p).clamp_min(0).double() / gamma).float()  # gamma = inf: exp(-0) = 1
    return (keep_BN[..., None] * supervised * (k >= p) * decay).flatten(1).float()


def make_blocks(input_ids_BT, positions_BT, loss_mask_BT, lengths_B, anchors_BN, keep_BN, prefix_BN,
                block: int, mask_id: int, gamma: float) -> Blocks:
    ids, pos, labels = block_inputs(input_ids_BT, positions_BT, lengths_B, anchors_BN, prefix_BN, block, mask_id)
    weights = block_weights(loss_mask_BT, lengths_B, anchors_BN, keep_BN, prefix_BN, block, gamma)
    tokens = labels.view(*anchors_BN.shape, block)
    prev = torch.cat([tokens[..., :1], tokens[..., :-1]], dim=-1).flatten(1)
    return Blocks(ids_BQ=ids, pos_BQ=pos, labels_BQ=labels, weights_BQ=weights, prefix_BN=prefix_BN,
                  anchors_BN=anchors_BN, keep_BN=keep_BN, prev_BQ=prev)


def _chunk_terms(h_RH, head_VH, labels_R, shape, top_k: int):
    logits = shape(h_RH @ head_VH.T).to(torch.promote_types(h_RH.dtype, torch.float32))
    out = (F.cross_entropy(logits, labels_R, reduction="none"), logits.argmax(-1) == labels_R)
    return out + tuple(logits.topk(top_k)) if top_k else out


@dataclass
class SlotLogits:
    """What the loss needs of each scored slot's logits, without keeping them: cross-entropy (0 on unscored slots)
    and argmax hits [B, Q]; with a selector, the scored rows' flat indices and their top-k logits and ids [R, K]."""

    ce_BQ: torch.Tensor
    correct_BQ: torch.Tensor
    rows_R: torch.Tensor
    top_logits_RK: torch.Tensor | None = None
    top_ids_RK: torch.Tensor | None = None


def chunked_logits(h_BQH, head_VH, labels_BQ, scored_BQ, chunk_rows: int, shape=lambda x: x, top_k: int = 0):
    """The scored slots' logits (`shape` applied to h @ head.T), `chunk_rows` rows at a time (recomputed in backward
    when there is more than one chunk), so peak memory does not grow with anchors x block x vocab."""
    rows = scored_BQ.flatten().nonzero().squeeze(1)
    h = h_BQH.flatten(0, 1)[rows]
    y = labels_BQ.flatten()[rows]
    if head_VH.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
        head_VH = head_VH.to(h.dtype)  # once per call, not per chunk (under autocast the matmul casts itself)
    parts = []
    # One chunk holds every row's logits anyway: recomputing them in backward would only cost time.
    recompute = torch.is_grad_enabled() and rows.numel() > chunk_rows
    for s in range(0, rows.numel(), chunk_rows):
        args = (h[s:s + chunk_rows], head_VH, y[s:s + chunk_rows], shape, top_k)
        parts.append(checkpoint(_chunk_terms, *args, use_reentrant=False) if recompute else _chunk_terms(*args))
    dtype = torch.promote_types(h.dtype, torch.float32)
    ce = h.new_zeros(labels_BQ.numel(), dtype=dtype)
    correct = torch.zeros(labels_BQ.numel(), dtype=torch.bool, device=labels_BQ.device)
    top = [None, None]
    if parts:
        cols = list(zip(*parts))
        ce = ce.index_put((rows,), torch.cat(cols[0]))
        correct[rows] = torch.cat(cols[1])
        if top_k:
            top = [torch.cat(cols[2]), torch.cat(cols[3])]
    elif top_k:
        top = [h.new_zeros(0, top_k, dtype=dtype), torch.zeros(0, top_k, dtype=torch.long, device=h.device)]
    return SlotLogits(ce.view_as(labels_BQ), correct.view_as(labels_BQ), rows, *top)


def dpace_weights(ce_BNK: torch.Tensor, scored_BNK: torch.Tensor, alpha: float) -> torch.Tensor:
    """D-PACE slot weights (arXiv 2605.18810) from the drafter's own per-slot cross-entropy, which the caller
    detaches: q_k = exp(-CE_k) smoothed to (1 - alpha) q_k + alpha, P_k = prod_{i<=k} q_i with every unscored slot
    counting 1 (so a VP block's product starts at its first masked slot), w_k = sum_{m>=k} P_m [m scored], and 0 on
    unscored slots. A slot weighs what the block still expects to gain from it being right."""
    q = torch.where(scored_BNK, (1 - alpha) * torch.exp(-ce_BNK) + alpha, torch.ones_like(ce_BNK))
    reach = torch.cumprod(q, dim=-1) * scored_BNK
    return reach.flip(-1).cumsum(-1).flip(-1) * scored_BNK


def block_stats(correct_BQ, blocks: Blocks, block: int) -> dict[str, torch.Tensor]:
    """Sums that add up over micro-batches, ranks and steps: per-slot hits and scored counts, and the
    accepted-prefix total of kept blocks (the anchor-averaged acceptance estimate, not the replayed tau)."""
    B, N = blocks.anchors_BN.shape
    correct = correct_BQ.view(B, N, block)
    scored = (blocks.weights_BQ.view(B, N, block) > 0)
    k = torch.arange(block, device=correct.device)
    given = k < blocks.prefix_BN[..., None]
    run = torch.cumprod((correct | given)[..., 1:].long(), dim=-1).sum(-1) - (blocks.prefix_BN - 1)
    kept = blocks.keep_BN
    return {"slot_hits": (correct & scored).sum((0, 1)).double(), "slot_scored": scored.sum((0, 1)).double(),
            "accepted": ((run.clamp_min(0) + 1) * kept).sum().double(), "blocks": kept.sum().double()}


def draft_vocab(token_freq_V: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent supervised tokens (ties by lower id), in ascending id order; counts may be weighted
    (a mixture of caches)."""
    V = token_freq_V.numel()
    if not 0 < size <= V:
        raise ValueError(f"objective.draft_vocab_size={size} must be in [1, {V}]")
    order = torch.sort(-torch.as_tensor(token_freq_V, dtype=torch.float64), stable=True).indices[:size]
    return order.sort().values


def target_to_draft(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] map from target id to draft id, -1 outside the draft vocabulary."""
    t2d = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_ids.device)
    t2d[draft_ids] = torch.arange(draft_ids.numel(), device=draft_ids.device)
    return t2d


def selector_terms(selector, h_RH, top: SlotLogits, prev_R, gold_R, draft_ids, stop_gradient: bool):
    """DFlash2's selector on the scored rows: cross-entropy over the strict unary top-k set of each slot after its
    true previous token (0 where the gold token is outside the set), whether the gold token is in the set, and
    whether the selector ranks it first. Candidates are draft ids; the codebooks take target ids."""
    logits, cand = top.top_logits_RK, top.top_ids_RK
    if stop_gradient:  # only the selector's own parameters learn from its loss
        h_RH, logits = h_RH.detach(), logits.detach()
    cand_target = cand if draft_ids is None else draft_ids[cand]
    scores = logits + selector.transition(h_RH, prev_R, cand_target).to(logits.dtype)
    in_set = cand == gold_R[:, None]
    contains = in_set.any(-1)
    where = in_set.long().argmax(-1)
    ce = F.cross_entropy(scores, where, reduction="none") * contains
    return ce, contains, contains & (scores.argmax(-1) == where)


class Objective:
    """Everything the loss needs beside the model: block size, mask id, slot weighting, anchors, the (draft) head,
    and for DFlash2 the selector loss's schedule over the run's `total_steps`."""

    def __init__(self, cfg: ObjectiveConfig, *, block_size: int, mask_id: int, head_VH: torch.Tensor, seed: int = 0,
                 draft_ids: torch.Tensor | None = None, backend: str = "dense", total_steps: int = 1):
        check_choice("objective.mode", cfg.mode, MODES)
        check_choice("objective.weighting", cfg.weighting, WEIGHTINGS)
        self.cfg = cfg
        self.block, self.mask_id, self.mode, self.seed = block_size, mask_id, cfg.mode, seed
        # D-PACE's weights come from the drafter's confidence at the loss: the blocks carry 1 on every scored slot.
        self.gamma = resolve_gamma(cfg.gamma, block_size) if cfg.weighting == "decay" else math.inf
        self.num_anchors, self.base, self.chunk_rows, self.backend = (cfg.num_anchors, cfg.prefix_weight_base,
                                                                      cfg.loss_chunk_rows, backend)
        self.total_steps = total_steps
        self.head_VH, self.t2d, self.draft_ids = head_VH, None, None
        if draft_ids is not None:
            # The head is frozen, so the draft-vocabulary rows are gathered once, not at every step.
            self.draft_ids = draft_ids.to(head_VH.device)
            self.head_VH, self.t2d = head_VH[self.draft_ids], target_to_draft(self.draft_ids, head_VH.shape[0])

    def blocks(self, batch: dict, step: int) -> Blocks:
        """Anchors, prefixes, block inputs, labels and weights of one micro-batch. Labels are draft-vocabulary
        ids when the drafter has a reduced vocabulary; targets outside it weigh 0 (they cannot be drafted)."""
        anchors, keep = sample_anchors(batch["loss_mask"], batch["lengths"], batch["sample_ids"], self.num_anchors,
                                       self.seed, step)
        prefix = sample_prefix(keep, batch["sample_ids"], self.seed, step, self.block, self.base, self.mode)
        blocks = make_blocks(batch["input_ids"], batch["positions"], batch["loss_mask"], batch["lengths"], anchors,
                             keep, prefix, self.block, self.mask_id, self.gamma)
        if self.t2d is not None:
            labels = self.t2d[blocks.labels_BQ]
            blocks.weights_BQ = blocks.weights_BQ * (labels >= 0)
            blocks.labels_BQ = labels.clamp_min(0)
        return blocks

    def slot_weights(self, ce_BQ: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        """Each slot's loss weight: the blocks' decayed weights, or D-PACE's from the (detached) cross-entropy."""
        if self.cfg.weighting == "decay":
            return blocks.weights_BQ
        B, N = blocks.anchors_BN.shape
        scored = (blocks.weights_BQ > 0).view(B, N, self.block)
        return dpace_weights(ce_BQ.view(B, N, self.block), scored, self.cfg.dpace_alpha).flatten(1)

    def selector_weight(self, step: int | None) -> float:
        """The selector loss's weight at optimizer step `step` (None: the full weight, as evaluation reports it)."""
        alpha = self.cfg.selector_alpha
        if step is None:
            return alpha
        warm, ramp = self.cfg.selector_warmup * self.total_steps, self.cfg.selector_ramp * self.total_steps
        if step < warm:
            return 0.0
        return alpha if step >= warm + ramp else alpha * (step - warm) / ramp

    def loss(self, model, batch: dict, blocks: Blocks, step: int | None = None):
        """(sum of w * CE plus DFlash2's weighted selector term, statistics as sums); "weight" in the statistics is
        the normaliser: the caller divides the step's gradient by its sum over the step (every micro-batch on every
        rank). `step` (the optimizer step) sets the selector's weight."""
        core = getattr(model, "module", model)  # DDP's wrapper forwards calls, not attributes
        mask = build_mask(blocks.anchors_BN, batch["lengths"], batch["input_ids"].shape[1], self.block, self.backend)
        h = model(batch["hidden"], batch["positions"], blocks.ids_BQ, blocks.pos_BQ, mask, self.backend)
        selector = core.selector
        top_k = selector.top_k if selector is not None else 0
        scored = blocks.weights_BQ > 0
        slots = chunked_logits(h, self.head_VH, blocks.labels_BQ, scored, self.chunk_rows, core.shape_logits, top_k)
        weights = self.slot_weights(slots.ce_BQ.detach(), blocks)
        loss_sum = (weights * slots.ce_BQ).sum()
        stats = {"loss_sum": loss_sum.detach().double(),
                 "weight": (weights.sum() if self.cfg.normalizer == "weight" else scored.sum()).double(),
                 "tokens": batch["loss_mask"].sum().double()}
        if selector is None:
            return loss_sum, {**stats, **block_stats(slots.correct_BQ, blocks, self.block)}
        rows = slots.rows_R
        alpha = self.selector_weight(step)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.selector_alpha > 0):
            ce, contains, hit = selector_terms(selector, h.flatten(0, 1)[rows], slots, blocks.prev_BQ.flatten()[rows],
                                               blocks.labels_BQ.flatten()[rows], self.draft_ids,
                                               self.cfg.selector_stop_gradient)
            selector_sum = (weights.flatten()[rows] * ce).sum()
        selected = torch.zeros_like(slots.correct_BQ).flatten().index_put((rows,), hit).view_as(slots.correct_BQ)
        unary = block_stats(slots.correct_BQ, blocks, self.block)
        stats.update(block_stats(selected, blocks, self.block), accepted_unary=unary["accepted"],
                     selector_loss_sum=selector_sum.detach().double(), candidate_hits=contains.sum().double(),
                     candidate_scored=scored.sum().double())
        total = loss_sum + alpha * selector_sum if selector_sum.requires_grad else loss_sum
        return total, stats
