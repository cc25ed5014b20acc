"""The DFlash / VP training objective: anchors, blocks, same-position labels, decayed weights, chunked loss.

Block j of a sequence starts at anchor a_j: slot 0 holds input_ids[a_j] (the last verified token), slots
1..B-1 hold the mask id (VP: slots < p hold the real tokens) and slot k is trained to predict
input_ids[a_j + k] at position pos[a_j] + k, with weight keep_j * loss_mask[a_j+k] * exp(-(k-s)/gamma) for
k >= s, where s = 1 (DFlash) or p (VP). All randomness is a hash of (seed, step, sample, position), so a
batch's draws do not depend on its padding and a resumed run draws exactly what the first run would have.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.config import GAMMA_BY_BLOCK

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


def default_gamma(block: int) -> float:
    return GAMMA_BY_BLOCK.get(block, 7.0 * block / 16)


def sample_anchors(loss_mask_BT, lengths_B, sample_ids_B, num_anchors: int, seed: int, step: int):
    """Up to `num_anchors` distinct anchors per sequence among loss-mask positions that have a next token.

    Returns anchors [B, N] in increasing order and keep [B, N] (False where a sequence had fewer candidates).
    """
    B, T = loss_mask_BT.shape
    pos = torch.arange(T, device=loss_mask_BT.device)
    candidate = loss_mask_BT & (pos[None] + 1 < lengths_B[:, None])
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
    if mode == "dflash":
        return torch.ones_like(keep_BN, dtype=torch.long)
    if mode != "vp":
        raise ValueError(f"objective.mode={mode!r}; choose dflash or vp")
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


def make_blocks(input_ids_BT, positions_BT, loss_mask_BT, lengths_B, anchors_BN, keep_BN, prefix_BN,
                block: int, mask_id: int, gamma: float) -> Blocks:
    B, N = anchors_BN.shape
    k = torch.arange(block, device=anchors_BN.device)
    idx_BNK = anchors_BN[..., None] + k  # absolute positions of the slots
    valid = idx_BNK < lengths_B[:, None, None]
    safe = idx_BNK.clamp_max(input_ids_BT.shape[1] - 1)
    flat = safe.flatten(1)
    tokens = input_ids_BT.gather(1, flat).view(B, N, block)
    supervised = loss_mask_BT.gather(1, flat).view(B, N, block) & valid
    p = prefix_BN[..., None]
    visible = (k < p) & valid
    ids = torch.where(visible, tokens, torch.full_like(tokens, mask_id))
    anchor_pos = positions_BT.gather(1, anchors_BN)
    pos = anchor_pos[..., None] + k
    decay = torch.exp(-(k - p).clamp_min(0).double() / gamma).float()
    weights = keep_BN[..., None] * supervised * (k >= p) * decay
    return Blocks(ids_BQ=ids.flatten(1), pos_BQ=pos.flatten(1), labels_BQ=tokens.flatten(1),
                  weights_BQ=weights.flatten(1).float(), prefix_BN=prefix_BN, anchors_BN=anchors_BN,
                  keep_BN=keep_BN)


def _chunk_terms(h_RH, head_VH, labels_R, weights_R):
    logits = (h_RH @ head_VH.to(h_RH.dtype).T).to(torch.promote_types(h_RH.dtype, torch.float32))
    ce = F.cross_entropy(logits, labels_R, reduction="none")
    return (ce * weights_R).sum(), (logits.argmax(-1) == labels_R)


def chunked_loss(h_BQH, head_VH, labels_BQ, weights_BQ, chunk_rows: int,
                 target_to_draft: torch.Tensor | None = None):
    """sum(w * CE) / sum(w) over loss rows only, `chunk_rows` rows of logits at a time (recomputed in
    backward), so peak memory does not grow with anchors x block x vocab. Returns (loss, correct_BQ)."""
    labels = labels_BQ
    weights = weights_BQ
    if target_to_draft is not None:
        labels = target_to_draft[labels_BQ]
        weights = weights * (labels >= 0)  # targets outside the draft vocabulary cannot be drafted
        labels = labels.clamp_min(0)
    rows = weights.flatten().nonzero().squeeze(1)
    h = h_BQH.flatten(0, 1)[rows]
    y, w = labels.flatten()[rows], weights.flatten()[rows]
    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    hits = torch.zeros_like(y, dtype=torch.bool)
    for s in range(0, rows.numel(), chunk_rows):
        part = slice(s, s + chunk_rows)
        if torch.is_grad_enabled():
            loss_sum, hit = checkpoint(_chunk_terms, h[part], head_VH, y[part], w[part], use_reentrant=False)
        else:
            loss_sum, hit = _chunk_terms(h[part], head_VH, y[part], w[part])
        total = total + loss_sum
        hits[part] = hit
    correct = torch.zeros(labels_BQ.numel(), dtype=torch.bool, device=labels_BQ.device)
    correct[rows] = hits
    return total / w.sum().clamp_min(1e-8), correct.view_as(labels_BQ)


def block_metrics(correct_BQ, blocks: Blocks, block: int) -> dict:
    """Per-slot accuracy and the anchor-averaged acceptance estimate (mean accepted prefix + 1)."""
    B, N = blocks.anchors_BN.shape
    correct = correct_BQ.view(B, N, block)
    scored = (blocks.weights_BQ.view(B, N, block) > 0)
    k = torch.arange(block, device=correct.device)
    given = k < blocks.prefix_BN[..., None]
    run = torch.cumprod((correct | given)[..., 1:].long(), dim=-1).sum(-1) - (blocks.prefix_BN - 1)
    kept = blocks.keep_BN
    tau = ((run.clamp_min(0) + 1).float() * kept).sum() / kept.sum()  # nan when no block was kept
    scored_per_slot = scored.sum((0, 1))
    acc = (correct & scored).sum((0, 1)).float() / scored_per_slot.clamp_min(1)
    # One transfer for all values: a .item() per slot would synchronise with the GPU block_size times a step.
    values = torch.cat([tau[None], acc, scored_per_slot.float()]).tolist()
    out = {"acceptance_estimate": values[0]}
    out.update({f"acc_{s}": values[1 + s] for s in range(1, block) if values[1 + block + s] > 0})
    return out


def draft_vocab(token_freq_V: torch.Tensor, size: int):
    """The `size` most frequent supervised tokens (ties by id): (draft ids [size], target->draft map [V])."""
    V = token_freq_V.numel()
    if not 0 < size <= V:
        raise ValueError(f"objective.draft_vocab_size={size} must be in [1, {V}]")
    order = torch.sort(-torch.as_tensor(token_freq_V, dtype=torch.long), stable=True).indices[:size]  # ties: lower id
    ids = order.sort().values
    t2d = torch.full((V,), -1, dtype=torch.long)
    t2d[ids] = torch.arange(size)
    return ids, t2d
