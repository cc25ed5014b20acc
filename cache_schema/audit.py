"""What the cached hidden states hold, beside whether their bytes are intact (verify.py): per captured layer, over a
sample of the cache's samples, the RMS, the share of exact zeros, non-finite values, whether the layer is constant,
and how much its RMS varies from sample to sample.

A layer is flagged
- `dead` when every value is zero, or within every sample every token holds the same vector (an engine that
  returned nothing, or one row for all: the all-zero states of vLLM's hybrid models before #46301);
- `non_finite` when any value is inf or NaN;
- `outlier` when its RMS is more than OUTLIER times above or below the median layer's (a wrong layer, a norm
  applied where none should be).
Training refuses a cache with a dead or non-finite layer unless told (`data.accept_flagged_layers`).
"""

import numpy as np
import torch

from cache_schema.reader import CacheReader

OUTLIER = 100.0  # residual streams grow with depth, but not by two orders of magnitude between captured layers
REFUSED = ("dead", "non_finite")  # what training will not train on unless told


def sampled(reader: CacheReader, samples: int) -> list[int]:
    """Up to `samples` sample ids spread evenly over the cache (deterministic: the same audit each time)."""
    n = len(reader)
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(samples, n))}) if n else []


def audit(reader: CacheReader, samples: int = 32) -> dict:
    """The per-layer statistics of `samples` samples and the layers flagged, as summary.json records them."""
    ids = sampled(reader, samples)
    layer_ids = list(reader.manifest.target_layer_ids)
    L = len(layer_ids)
    sq, zeros, bad, count = np.zeros(L), np.zeros(L), np.zeros(L, dtype=np.int64), 0
    varies = np.zeros(L, dtype=bool)
    per_sample = []
    for start in range(0, len(ids), 8):
        for s in reader.read_samples(ids[start:start + 8]):
            h = s.hidden_TLH.float()  # [T, L, H]
            finite = torch.isfinite(h)
            bad += (~finite).sum(dim=(0, 2)).numpy()
            h = torch.where(finite, h, torch.zeros_like(h))
            sq += h.pow(2).sum(dim=(0, 2)).double().numpy()
            zeros += (h == 0).sum(dim=(0, 2)).numpy()
            count += h.shape[0] * h.shape[2]
            per_sample.append(h.pow(2).mean(dim=(0, 2)).sqrt().numpy())
            if h.shape[0] > 1:  # whether any token differs from its sample's first, per layer
                varies |= (h[1:] != h[:1]).any(dim=2).any(dim=0).numpy()
    rms = np.sqrt(sq / max(count, 1))
    median = float(np.median(rms)) if L else 0.0
    spread = np.std(per_sample, axis=0) / np.maximum(np.mean(per_sample, axis=0), 1e-30) if per_sample else \
        np.zeros(L)
    layers = []
    for i, layer in enumerate(layer_ids):
        flags = []
        if count and (zeros[i] == count or not varies[i]):
            flags.append("dead")
        if bad[i]:
            flags.append("non_finite")
        if count and median > 0 and "dead" not in flags and not 1 / OUTLIER <= rms[i] / median <= OUTLIER:
            flags.append("outlier")
        layers.append({"layer": layer, "rms": float(rms[i]), "zero_share": float(zeros[i] / max(count, 1)),
                       "non_finite": int(bad[i]), "sample_rms_spread": float(spread[i]), "flags": flags})
    flagged = {str(x["layer"]): x["flags"] for x in layers if x["flags"]}
    return {"samples": len(ids), "tokens": count // max(reader.manifest.target.hidden_size, 1), "layers": layers,
            "flagged": flagged, "verdict": "flagged: " + "; ".join(f"layer {k} {', '.join(v)}" for k, v in
                                                               flagged.items()) if flagged else "ok"}


def refused_layers(report: dict) -> dict[str, list[str]]:
    """The layers of an audit that training refuses, with why."""
    flagged = report.get("flagged", {})
    return {k: [f for f in v if f in REFUSED] for k, v in flagged.items()
            if isinstance(v, list) and any(f in REFUSED for f in v)}


def recorded_or_fresh(reader: CacheReader, samples: int = 16) -> dict:
    """The audit extraction recorded in summary.json, or, for a cache that has none (or a malformed one), a fresh
    one over `samples` samples."""
    report = (reader.summary() or {}).get("audit")
    if isinstance(report, dict) and isinstance(report.get("flagged"), dict):
        return report
    return audit(reader, samples)
