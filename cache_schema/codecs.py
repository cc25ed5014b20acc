"""Hidden-state codecs: bf16 stored bit-exactly as 16-bit words, and fp8 e4m3 with per-token, per-layer scales."""

import numpy as np
import torch

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def bf16_to_words(hidden: torch.Tensor) -> np.ndarray:
    """bf16 (or any float, cast to bf16) -> uint16 words with the same bits."""
    return hidden.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def words_to_bf16(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int16)).view(torch.bfloat16)


def fp8_encode(hidden_TLH: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Scale each [token, layer] row so its max magnitude maps to the e4m3 max; return (uint8 codes, scales)."""
    x = hidden_TLH.detach().to(torch.bfloat16).float().cpu()
    scale_TL = x.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX
    codes = (x / scale_TL[..., None]).to(torch.float8_e4m3fn)
    return codes.view(torch.uint8).numpy(), scale_TL.numpy().astype(np.float32)


def fp8_decode(codes: np.ndarray, scale_TL: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float()
    return (x * torch.from_numpy(np.ascontiguousarray(scale_TL))[..., None]).to(torch.bfloat16)
