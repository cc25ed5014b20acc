"""Hidden-state codecs, one table: bf16 stored bit-exactly as 16-bit words, and fp8 e4m3 with per-token,
per-layer scales. Writer, reader, verification and inspection all go through `CODECS[hidden_dtype]`."""

from dataclasses import dataclass
from typing import Callable

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


@dataclass(frozen=True)
class HiddenCodec:
    """How one storage dtype turns `hidden_TLH` into token-axis arrays and back.

    `arrays` maps each stored array to (row shape as a function of (L, H), numpy dtype); `encode` returns the
    arrays in that order and `decode` takes them in that order.
    """

    name: str
    arrays: dict[str, tuple[Callable[[int, int], tuple], str]]
    encode: Callable[[torch.Tensor], tuple[np.ndarray, ...]]
    decode: Callable[..., torch.Tensor]

    def row_shapes(self, num_layers: int, hidden_size: int) -> dict[str, tuple[tuple, str]]:
        return {name: (shape(num_layers, hidden_size), dtype) for name, (shape, dtype) in self.arrays.items()}


# Torch dtypes by the names settings use (target.dtype, export --dtype): stated once for both stages.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CODECS = {
    "bf16": HiddenCodec("bf16", {"hidden": (lambda L, H: (L, H), "uint16")},
                        encode=lambda h: (bf16_to_words(h),), decode=words_to_bf16),
    "fp8_e4m3": HiddenCodec("fp8_e4m3", {"hidden": (lambda L, H: (L, H), "uint8"),
                                         "hidden_scale": (lambda L, H: (L,), "float32")},
                            encode=fp8_encode, decode=fp8_decode),
}
