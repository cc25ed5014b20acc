"""`tools.inspect_cache --recompute N`: N cached samples rerun through the target in transformers, each captured
layer compared with the cache.

The cache holds token ids, not pixels: a sample's images come from the input shard its metadata names (`source`),
found there by its key and preprocessed by the target's own processor; a sample whose shard is gone (or no longer
holds the key) is reported as not rechecked. The forward is one teacher-forced pass over the cached ids, as
extraction's capture is. Per layer the report gives ||cache - fresh|| / ||fresh|| over the rechecked tokens against
the tolerance of the cache's storage (its rounding) and of the target's dtype (other kernels, other batches):
beyond it, the capture went wrong (a wrong layer index, a shifted position, an engine whose kernels differ).
"""

import logging
from pathlib import Path

import torch

from cache_schema import CacheReader
from cache_schema.audit import sampled

log = logging.getLogger("recompute")
# Relative L2 error a correct capture stays under: bf16 storage rounds each value by at most 2^-9 relative, fp8 e4m3
# by 2^-4; a 16-bit target computed by other kernels or another batch adds about 1% more.
STORAGE_TOLERANCE = {"bf16": 0.01, "fp8_e4m3": 0.07}
HALF_PRECISION_EXTRA = 0.02


def _conversation(source: str, key: str):
    from extract.sources import conversations

    local = "://" not in source and not source.startswith("pipe:")
    if not source or (local and not Path(source).exists()):
        return None
    try:
        return next((c for c in conversations(source, "auto", lambda k, skip: None) if c.key == key), None)
    except (OSError, ValueError):
        return None


def model_inputs(target, ids: torch.Tensor, images: list) -> dict:
    """The forward's inputs for cached ids: the processor's image tensors for `images`, per-token fields from the
    ids themselves."""
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    if not images:
        return inputs
    placeholder = target.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(images)}], tokenize=False)
    encoded = dict(target.processor(text=[placeholder], images=images, return_tensors="pt"))
    for k, v in encoded.items():
        if k not in ("input_ids", "attention_mask", "mm_token_type_ids"):
            inputs[k] = v
    if "mm_token_type_ids" in encoded:  # 1 on the image placeholder tokens
        image_ids = target.token_ids(target.traits.chat.expanded)
        inputs["mm_token_type_ids"] = torch.isin(ids, torch.tensor(image_ids)).long()[None]
    return inputs


@torch.no_grad()
def recompute(reader: CacheReader, n: int, target_path: str | None = None) -> dict:
    from extract.target import load_target

    m = reader.manifest
    dtype = (m.generation or {}).get("target_dtype", "float32")
    path = target_path or m.target.name_or_path
    target = load_target(path, dtype=dtype, device="cpu")
    layer_ids = list(m.target_layer_ids)
    diff2, ref2 = torch.zeros(len(layer_ids), dtype=torch.float64), torch.zeros(len(layer_ids), dtype=torch.float64)
    rechecked, skipped = [], {}
    for index in sampled(reader, n):
        sample = reader[index]
        images = []
        if sample.meta.get("num_images", 0):
            conv = _conversation(sample.meta.get("source", ""), sample.key)
            if conv is None:
                skipped[sample.key] = f"its input shard {sample.meta.get('source')!r} is gone or no longer holds it"
                continue
            images = conv.images[:sample.meta["num_images"]]
        ids = torch.from_numpy(sample.input_ids.astype("int64"))
        inputs = {k: v.to(target.device) if torch.is_tensor(v) else v
                  for k, v in model_inputs(target, ids, images).items()}
        with target.capture(layer_ids) as captured:
            target.model(**inputs, use_cache=False, logits_to_keep=1)
        fresh = torch.stack([captured[i][0] for i in layer_ids], dim=1).double().cpu()
        cached = sample.hidden_TLH.double()
        diff2 += (cached - fresh).pow(2).sum(dim=(0, 2))
        ref2 += fresh.pow(2).sum(dim=(0, 2))
        rechecked.append(sample.key)
    tolerance = STORAGE_TOLERANCE[m.storage.hidden_dtype] + (HALF_PRECISION_EXTRA if dtype != "float32" else 0.0)
    errors = (diff2.sqrt() / ref2.sqrt().clamp_min(1e-30)).tolist()
    layers = [{"layer": layer, "relative_error": err, "within_tolerance": err <= tolerance}
              for layer, err in zip(layer_ids, errors)] if rechecked else []
    return {"target": str(path), "target_dtype": dtype, "tolerance": tolerance, "rechecked": len(rechecked),
            "not_rechecked": skipped, "layers": layers,
            "beyond_tolerance": [x["layer"] for x in layers if not x["within_tolerance"]]}


def recompute_table(report: dict) -> str:
    rows = [f"recompute: {report['rechecked']} samples rerun through {report['target']} ({report['target_dtype']}); "
            f"tolerance {report['tolerance']:.1%} relative L2",
            "| layer | relative error | within tolerance |", "|---|---|---|"]
    rows += [f"| {x['layer']} | {x['relative_error']:.2e} | {'yes' if x['within_tolerance'] else 'NO'} |"
             for x in report["layers"]]
    rows += [f"not rechecked {k}: {why}" for k, why in report["not_rechecked"].items()]
    return "\n".join(rows)
