"""DFlash drafter: Qwen3-style decoder layers that attend to a fused projection of the target's hidden states.

    context_BTH = hidden_norm(fc(concat_L(hidden_BTLH)))          once, shared by every layer
    per layer:  q from block tokens; k, v = [k_proj/v_proj(context) ; k_proj/v_proj(block)]
                non-causal inside a block, context strictly before the block's anchor (see train/blocks.py)
    logits    = target_lm_head(norm(h))                           embedding and head are the target's, frozen
"""

import torch
import torch.nn.functional as F
from torch import nn

from train.attention import attend
from train.config import DrafterConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """RoPE over the first `partial_rotary_factor` of each head, half-split layout as in Qwen3."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.rot = int(cfg.head_dim * cfg.partial_rotary_factor) // 2 * 2
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, self.rot, 2, dtype=torch.float32) / self.rot)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x_BhSD, pos_BS):
        angles = pos_BS.float()[:, None, :, None] * self.inv_freq  # [B, 1, S, rot/2]
        cos, sin = angles.cos().to(x_BhSD.dtype), angles.sin().to(x_BhSD.dtype)
        rot, rest = x_BhSD[..., :self.rot], x_BhSD[..., self.rot:]
        a, b = rot.chunk(2, dim=-1)
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        return torch.cat([rotated, rest], dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.h, self.kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)

    def _heads(self, x, n):
        return x.unflatten(-1, (n, self.d)).transpose(1, 2)  # [B, n, S, D]

    def forward(self, x_BQH, ctx_BTH, pos_BQ, ctx_pos_BT, rope: Rotary, mask, backend: str):
        q = rope(self.q_norm(self._heads(self.q_proj(x_BQH), self.h)), pos_BQ)
        k_ctx = rope(self.k_norm(self._heads(self.k_proj(ctx_BTH), self.kv)), ctx_pos_BT)
        k_blk = rope(self.k_norm(self._heads(self.k_proj(x_BQH), self.kv)), pos_BQ)
        v = torch.cat([self._heads(self.v_proj(ctx_BTH), self.kv), self._heads(self.v_proj(x_BQH), self.kv)], dim=2)
        out = attend(q, torch.cat([k_ctx, k_blk], dim=2), v, mask, backend)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx, pos, ctx_pos, rope, mask, backend):
        # The context stream gets no input_layernorm: hidden_norm already normalised it.
        x = x + self.self_attn(self.input_layernorm(x), ctx, pos, ctx_pos, rope, mask, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Drafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, embed_VH: torch.Tensor, lm_head_VH: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.target_layer_ids)
        self.fc = nn.Linear(n * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = Rotary(cfg)
        # Frozen target tensors: buffers, so optimisers and gradient syncs never see them.
        self.register_buffer("embed_VH", embed_VH.detach().clone(), persistent=False)
        self.register_buffer("lm_head_VH", lm_head_VH.detach().clone(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)

    def context(self, hidden_BTLH: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(self.fc(hidden_BTLH.flatten(2).to(self.fc.weight.dtype)))

    def forward(self, hidden_BTLH, ctx_pos_BT, block_ids_BQ, block_pos_BQ, mask, backend: str = "dense"):
        """Final hidden states [B, Q, H] of the block slots (apply `logits` for the vocabulary)."""
        ctx = self.context(hidden_BTLH)
        x = F.embedding(block_ids_BQ, self.embed_VH).to(ctx.dtype)
        for layer in self.layers:
            x = layer(x, ctx, block_pos_BQ, ctx_pos_BT, self.rope, mask, backend)
        return self.norm(x)

    def logits(self, h_BQH: torch.Tensor) -> torch.Tensor:
        return h_BQH @ self.lm_head_VH.to(h_BQH.dtype).T
