"""DFlash drafter: Qwen3-style decoder layers that attend to a fused projection of the target's hidden states.

    context_BTH = hidden_norm(fc(concat_L(hidden_BTLH)))          once, shared by every layer
    per layer:  q from block tokens; k, v = [k_proj/v_proj(context) ; k_proj/v_proj(block)]
                non-causal inside a block, context strictly before the block's anchor (see train/attention.py)
    logits    = target_lm_head(norm(h))                           embedding and head are the target's, frozen

DFlash2 (drafter.architecture=dflash2) adds a grouped dynamic convolution around every sublayer and a candidate
selector over the head's top-k (train/dflash2.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from train.attention import attend
from train.config import DrafterConfig
from train.dflash2 import CandidateSelector, GroupedDynamicConv, shape_logits


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

    def context_kv(self, ctx_BTH, ctx_pos_BT, rope: Rotary):
        """This layer's keys and values of the fused context, as `forward` computes them."""
        k = rope(self.k_norm(self._heads(self.k_proj(ctx_BTH), self.kv)), ctx_pos_BT)
        return k, self._heads(self.v_proj(ctx_BTH), self.kv)

    def attend_cached(self, x_BQH, pos_BQ, k_ctx, v_ctx, rope: Rotary):
        """Block queries over cached context keys/values [1, kv, T, D] and the whole block: nothing is masked,
        since the cache holds exactly the context the block may see. Every row of the batch shares it."""
        batch = x_BQH.shape[0]
        q = rope(self.q_norm(self._heads(self.q_proj(x_BQH), self.h)), pos_BQ)
        k = rope(self.k_norm(self._heads(self.k_proj(x_BQH), self.kv)), pos_BQ)
        v = self._heads(self.v_proj(x_BQH), self.kv)
        if k_ctx is not None:
            k = torch.cat([k_ctx.expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([v_ctx.expand(batch, -1, -1, -1), v], dim=2)
        out = attend(q, k, v, None, "dense")
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.convolved = cfg.architecture == "dflash2"
        if self.convolved:
            conv = (cfg.hidden_size, cfg.block_size, cfg.conv_kernel_size, cfg.conv_group_size)
            self.attention_conv = GroupedDynamicConv(*conv)
            self.mlp_conv = GroupedDynamicConv(*conv)

    def _sublayer(self, conv_name: str, x, sublayer):
        """sublayer(x), wrapped in its convolution for DFlash2 (prepare after the norm, finish before the add)."""
        if not self.convolved:
            return sublayer(x)
        conv = getattr(self, conv_name)
        x, delta = conv.prepare(x)
        return conv.finish(sublayer(x), delta)

    def forward(self, x, ctx, pos, ctx_pos, rope, mask, backend):
        # The context stream gets no input_layernorm: hidden_norm already normalised it.
        x = x + self._sublayer("attention_conv", self.input_layernorm(x),
                               lambda a: self.self_attn(a, ctx, pos, ctx_pos, rope, mask, backend))
        return x + self._sublayer("mlp_conv", self.post_attention_layernorm(x), self.mlp)

    def forward_cached(self, x, pos, k_ctx, v_ctx, rope):
        x = x + self._sublayer("attention_conv", self.input_layernorm(x),
                               lambda a: self.self_attn.attend_cached(a, pos, k_ctx, v_ctx, rope))
        return x + self._sublayer("mlp_conv", self.post_attention_layernorm(x), self.mlp)


class Drafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, embed_VH: torch.Tensor | None, lm_head_VH: torch.Tensor | None):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.target_layer_ids)
        self.fc = nn.Linear(n * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = Rotary(cfg)
        if cfg.architecture == "dflash2":
            self.candidate_selector = CandidateSelector(cfg.vocab_size, cfg.hidden_size, cfg.selector_rank,
                                                        cfg.selector_top_k)
        # Frozen target tensors: buffers in the cache's dtype (bf16), so optimisers and gradient syncs never see
        # them and they cost what they cost the target. None (e.g. for export) leaves the drafter headless.
        self.register_buffer("embed_VH", None if embed_VH is None else embed_VH.detach(), persistent=False)
        self.register_buffer("lm_head_VH", None if lm_head_VH is None else lm_head_VH.detach(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
        # DFlash2's parts start as no-ops: identity convolutions, a selector that keeps the unary order.
        for module in self.modules():
            if isinstance(module, GroupedDynamicConv):
                module.reset_parameters()
            elif isinstance(module, CandidateSelector):
                module.reset_parameters(std)

    @property
    def selector(self) -> CandidateSelector | None:
        return getattr(self, "candidate_selector", None)

    def shape_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The drafter's logits from the head's raw ones (DFlash2 scales and caps them as configured)."""
        return shape_logits(logits, self.cfg.output_multiplier, self.cfg.final_logit_softcapping)

    def context(self, hidden_BTLH: torch.Tensor) -> torch.Tensor:
        return self.hidden_norm(self.fc(hidden_BTLH.flatten(2).to(self.fc.weight.dtype)))

    def forward(self, hidden_BTLH, ctx_pos_BT, block_ids_BQ, block_pos_BQ, mask, backend: str = "dense"):
        """Final hidden states [B, Q, H] of the block slots (the target's head gives the vocabulary)."""
        ctx = self.context(hidden_BTLH)
        x = F.embedding(block_ids_BQ, self.embed_VH).to(ctx.dtype)
        for layer in self.layers:
            x = layer(x, ctx, block_pos_BQ, ctx_pos_BT, self.rope, mask, backend)
        return self.norm(x)

    # Inference (tools/speculative_decoder.py): the drafter keeps its own keys and values of the fused context, grown as
    # the target verifies tokens, and drafts after all of it; this equals `forward` for a block anchored right
    # after the context, where the mask hides nothing of it (tests/test_spec_decode.py).

    def extend_context(self, cache: "ContextCache", hidden_BTLH, ctx_pos_BT) -> None:
        """Append the fused context of newly verified positions (batch 1) to every layer's keys and values."""
        ctx = self.context(hidden_BTLH)
        for i, layer in enumerate(self.layers):
            cache.append(i, *layer.self_attn.context_kv(ctx, ctx_pos_BT, self.rope))

    def draft(self, cache: "ContextCache", block_ids_BQ, block_pos_BQ) -> torch.Tensor:
        """Final hidden states [B, Q, H] of blocks drafted after the cached context (every row shares it)."""
        x = F.embedding(block_ids_BQ, self.embed_VH).to(self.fc.weight.dtype)
        for i, layer in enumerate(self.layers):
            x = layer.forward_cached(x, block_pos_BQ, cache.keys[i], cache.values[i], self.rope)
        return self.norm(x)


class ContextCache:
    """Per drafter layer, the rotated, normed keys and the values of the fused context seen so far [1, kv, T, D]."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        old_k, old_v = self.keys[layer], self.values[layer]
        self.keys[layer] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self.values[layer] = v if old_v is None else torch.cat([old_v, v], dim=2)
