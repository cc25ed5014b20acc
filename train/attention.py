"""Attention backends over one mask definition: flex attention (CUDA) and dense-mask SDPA (anywhere).

The mask is defined once, by `block_mask_fn`: query slot (j, k) sees context positions strictly before
anchor a_j that exist in its sequence, and every slot of its own block; nothing of other blocks.
"""

import torch
import torch.nn.functional as F


def block_mask_fn(anchors_BN: torch.Tensor, lengths_B: torch.Tensor, ctx_len: int, block: int):
    """mask_mod(b, h, q, kv) -> bool, usable by flex attention and, vectorised, to build a dense mask."""

    def mask_mod(b, h, q_idx, kv_idx):
        j = q_idx // block
        anchor = anchors_BN[b, j]
        in_ctx = (kv_idx < ctx_len) & (kv_idx < anchor) & (kv_idx < lengths_B[b])
        same_block = (kv_idx >= ctx_len) & ((kv_idx - ctx_len) // block == j)
        return in_ctx | same_block

    return mask_mod


def dense_mask(mask_mod, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask_mod(b, 0, q, kv)  # [B, 1, Q, KV]


def flex_mask(mask_mod, batch: int, q_len: int, kv_len: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)


def build_mask(anchors_BN, lengths_B, ctx_len: int, block: int, backend: str):
    batch, n = anchors_BN.shape
    fn = block_mask_fn(anchors_BN, lengths_B, ctx_len, block)
    q_len, kv_len = n * block, ctx_len + n * block
    make = flex_mask if backend == "flex" else dense_mask
    return make(fn, batch, q_len, kv_len, anchors_BN.device)


_compiled_flex = None


def attend(q, k, v, mask, backend: str):
    """q [B, h, Q, D], k/v [B, kv, K, D] (grouped-query heads are repeated here)."""
    groups = q.shape[1] // k.shape[1]
    if backend == "flex":
        global _compiled_flex
        from torch.nn.attention.flex_attention import flex_attention

        if not q.is_cuda:  # eager flex materialises scores: for tests of the mask on CPU, not for speed
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=groups > 1)
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
