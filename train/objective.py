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
from train.config import MODES, ObjectiveConfig, check_choice

# DFlash's decay per block size (seed 002's Qwen3-VL recipe: B=8, gamma 4); other sizes scale 7 * B / 16.
GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}
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


def resolve_gamma(gamma: float | None, block: int) -> float:
    """`None` picks the block size's default; `inf` turns the decay off (every scored slot weighs 1)."""
    if gamma is None:
        return GAMMA_BY_BLOCK.get(block, 7.0 * block / 16)
    if not gamma > 0:
        raise ValueError(f"objective.gamma={gamma} must be > 0 (null: the default for the block size, inf: no "
                         "decay)")
    return float(gamma)


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
    return Blocks(ids_BQ=ids, pos_BQ=pos, labels_BQ=labels, weights_BQ=weights, prefix_BN=prefix_BN,
                  anchors_BN=anchors_BN, keep_BN=keep_BN)


def _chunk_terms(h_RH, head_VH, labels_R, weights_R):
    logits = (h_RH @ head_VH.T).to(torch.promote_types(h_RH.dtype, torch.float32))
    ce = F.cross_entropy(logits, labels_R, reduction="none")
    return (ce * weights_R).sum(), (logits.argmax(-1) == labels_R)


def chunked_loss(h_BQH, head_VH, labels_BQ, weights_BQ, chunk_rows: int):
    """sum(w * CE) over loss rows only, `chunk_rows` rows of logits at a time (recomputed in backward when there
    is more than one chunk), so peak memory does not grow with anchors x block x vocab. Returns (weighted loss
    sum, correct_BQ)."""
    rows = weights_BQ.flatten().nonzero().squeeze(1)
    h = h_BQH.flatten(0, 1)[rows]
    y, w = labels_BQ.flatten()[rows], weights_BQ.flatten()[rows]
    if head_VH.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
        head_VH = head_VH.to(h.dtype)  # once per call, not per chunk (under autocast the matmul casts itself)
    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    hits = torch.zeros_like(y, dtype=torch.bool)
    # One chunk holds every row's logits anyway: recomputing them in backward would only cost time.
    recompute = torch.is_grad_enabled() and rows.numel() > chunk_rows
    for s in range(0, rows.numel(), chunk_rows):
        part = slice(s, s + chunk_rows)
        if recompute:
            loss_sum, hit = checkpoint(_chunk_terms, h[part], head_VH, y[part], w[part], use_reentrant=False)
        else:
            loss_sum, hit = _chunk_terms(h[part], head_VH, y[part], w[part])
        total = total + loss_sum
        hits[part] = hit
    correct = torch.zeros(labels_BQ.numel(), dtype=torch.bool, device=labels_BQ.device)
    correct[rows] = hits
    return total, correct.view_as(labels_BQ)


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


def step_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn summed statistics into the logged metrics, in one device-to-host transfer."""
    host = {k: v.tolist() if torch.is_tensor(v) else v for k, v in sums.items()}
    out = {"loss": host["loss_sum"] / host["weight"] if host["weight"] else math.nan,
           "acceptance_estimate": host["accepted"] / host["blocks"] if host["blocks"] else math.nan,
           "supervised_tokens": host["tokens"]}
    out.update({f"acc_{s}": h / n for s, (h, n) in enumerate(zip(host["slot_hits"], host["slot_scored"])) if n})
    if "skipped_steps" in host:
        out["skipped_steps"] = host["skipped_steps"]
    return out


def add_sums(into: dict, new: dict) -> dict:
    for k, v in new.items():
        into[k] = into[k] + v if k in into else v
    return into


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


class Objective:
    """Everything the loss needs beside the model: block size, mask id, gamma, anchors, the (draft) head."""

    def __init__(self, cfg: ObjectiveConfig, *, block_size: int, mask_id: int, head_VH: torch.Tensor, seed: int = 0,
                 draft_ids: torch.Tensor | None = None, backend: str = "dense"):
        check_choice("objective.mode", cfg.mode, MODES)
        self.block, self.mask_id, self.mode, self.seed = block_size, mask_id, cfg.mode, seed
        self.gamma = resolve_gamma(cfg.gamma, block_size)
        self.num_anchors, self.base, self.chunk_rows, self.backend = (cfg.num_anchors, cfg.prefix_weight_base,
                                                                      cfg.loss_chunk_rows, backend)
        self.head_VH, self.t2d = head_VH, None
        if draft_ids is not None:
            # The head is frozen, so the draft-vocabulary rows are gathered once, not at every step.
            draft_ids = draft_ids.to(head_VH.device)
            self.head_VH, self.t2d = head_VH[draft_ids], target_to_draft(draft_ids, head_VH.shape[0])

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

    def loss(self, model, batch: dict, blocks: Blocks) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of w * CE, statistics as sums); divide the first by the step's total weight."""
        mask = build_mask(blocks.anchors_BN, batch["lengths"], batch["input_ids"].shape[1], self.block, self.backend)
        h = model(batch["hidden"], batch["positions"], blocks.ids_BQ, blocks.pos_BQ, mask, self.backend)
        loss_sum, correct = chunked_loss(h, self.head_VH, blocks.labels_BQ, blocks.weights_BQ, self.chunk_rows)
        stats = {"loss_sum": loss_sum.detach().double(), "weight": blocks.weights_BQ.sum().double(),
                 "tokens": batch["loss_mask"].sum().double(), **block_stats(correct, blocks, self.block)}
        return loss_sum, stats
