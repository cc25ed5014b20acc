"""DFlash drafter as a transformers model, for the `dflash` export (`AutoModel.from_pretrained(DIR,
trust_remote_code=True)`).

`python -m train.export --format dflash` copies this file into the export directory as `modeling_dflash.py`, so it
imports only torch and transformers, never this project. It holds the architecture of train/model.py under the
weight names of the original DFlash layout:

    target_hidden = hidden_norm(fc(concat of the captured target layers))   [B, T, L*H] -> [B, T, H]
    per layer:  q from the block; k, v = [k_proj/v_proj(target_hidden) ; k_proj/v_proj(block)]
    output    = norm(h) [B, Q, H]; the target's LM head turns it into logits (no embedding or head here)

`position_ids` [B, T+Q] are the context's positions followed by the block's; RoPE is plain 1-D over the whole head.
`attention_mask` (bool [B, 1, Q, T+Q], True = visible) defaults to everything visible: at inference the context is
exactly what precedes the block, and the block attends to itself in both directions.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Qwen3Config


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("DFlash config states no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


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


def rotate(x_BhSD, pos_BS, theta: float):
    # Computed per call rather than held in a buffer: transformers builds models on the meta device and does not
    # restore non-persistent buffers of remote code.
    dim = x_BhSD.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x_BhSD.device) / dim)
    angles = pos_BS.float()[:, None, :, None] * inv
    cos, sin = angles.cos().to(x_BhSD.dtype), angles.sin().to(x_BhSD.dtype)
    a, b = x_BhSD.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class DFlashAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.h, self.kv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.theta = rope_theta(config)
        self.q_proj = nn.Linear(config.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, config.rms_norm_eps)

    def _heads(self, x, n):
        return x.unflatten(-1, (n, self.d)).transpose(1, 2)

    def forward(self, x_BQH, ctx_BTH, position_ids, attention_mask):
        t = ctx_BTH.shape[1]
        q = rotate(self.q_norm(self._heads(self.q_proj(x_BQH), self.h)), position_ids[:, t:], self.theta)
        kv_in = torch.cat([ctx_BTH, x_BQH], dim=1)
        k = rotate(self.k_norm(self._heads(self.k_proj(kv_in), self.kv)), position_ids, self.theta)
        v = self._heads(self.v_proj(kv_in), self.kv)
        groups = self.h // self.kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DFlashMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DFlashMLP(config)

    def forward(self, x, ctx, position_ids, attention_mask):
        # The context gets no input_layernorm: hidden_norm already normalised it.
        x = x + self.self_attn(self.input_layernorm(x), ctx, position_ids, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(PreTrainedModel):
    config_class = Qwen3Config
    base_model_prefix = "dflash"
    _no_split_modules = ["DFlashDecoderLayer"]
    # Attention is computed with scaled_dot_product_attention whatever is asked, so loaders that request
    # attn_implementation="sdpa" (as the original DFlash code does) get exactly what runs.
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        factor = (getattr(config, "rope_parameters", None) or {}).get(
            "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if factor not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor={factor}: this DFlash model rotates the whole head")
        self.target_layer_ids = list(config.dflash_config["target_layer_ids"])
        self.mask_token_id = config.dflash_config["mask_token_id"]
        self.block_size = config.block_size
        self.fc = nn.Linear(len(self.target_layer_ids) * config.hidden_size, config.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, target_hidden, noise_embedding, position_ids, attention_mask=None, **kwargs):
        """target_hidden [B, T, L*H] (the captured layers concatenated in target_layer_ids order), noise_embedding
        [B, Q, H] (the target's embedding of the block), position_ids [B, T+Q] -> final hidden states [B, Q, H]."""
        ctx = self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))
        x = noise_embedding.to(ctx.dtype)
        for layer in self.layers:
            x = layer(x, ctx, position_ids, attention_mask)
        return self.norm(x)
