"""Full integrity check of a cache: every chunk's checksum, and each shard's bookkeeping against its marker."""

import numpy as np
from safetensors import SafetensorError
from tqdm import tqdm

from cache_schema.layout import HEAD_FILE, CacheCorruptionError
from cache_schema.reader import CacheReader

# Token rows read per step; bounded so verifying a large shard never holds it whole in memory.
ROWS_PER_READ = 4096


def _token_arrays(reader: CacheReader) -> list[str]:
    names = ["input_ids", "loss_mask", "position_ids", "hidden"]
    return names + (["hidden_scale"] if reader.manifest.storage.hidden_dtype != "bf16" else [])


def verify(url: str, progress: bool = True) -> dict:
    """Raise CacheCorruptionError naming the first bad shard and array; otherwise return a short report."""
    reader = CacheReader(url)
    m = reader.manifest
    row_shapes = {"hidden": (m.num_layers, m.target.hidden_size), "hidden_scale": (m.num_layers,),
                  "position_ids": (3,), "input_ids": (), "loss_mask": ()}
    total_tokens = reader.stats["tokens"]
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="verify", disable=not progress)
    for shard in reader.shards:
        marker = reader.markers[shard]
        offsets = reader.offsets(shard)
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != marker["tokens"]:
            raise CacheCorruptionError(f"shard {shard}, array offsets: not a monotone 0..{marker['tokens']} range")
        if len(reader.metas(shard)) != marker["samples"]:
            raise CacheCorruptionError(f"shard {shard}, array meta: {len(reader.metas(shard))} entries, "
                                       f"marker says {marker['samples']} samples")
        freq = reader.read(shard, "token_freq")
        if freq.shape != (m.target.vocab_size,):
            raise CacheCorruptionError(f"shard {shard}, array token_freq: shape {freq.shape}")
        group = reader.loc.open_shard(shard, mode="r")
        for name in _token_arrays(reader):
            shape = tuple(group[name].shape) if name in group else None
            if shape != (marker["tokens"], *row_shapes[name]):
                raise CacheCorruptionError(f"shard {shard}, array {name}: shape {shape}, expected "
                                           f"{(marker['tokens'], *row_shapes[name])}")
        supervised = 0
        for start in range(0, marker["tokens"], ROWS_PER_READ):
            rows = slice(start, min(start + ROWS_PER_READ, marker["tokens"]))
            for name in _token_arrays(reader):
                block = reader.read(shard, name, rows)
                if name == "loss_mask":
                    supervised += int(block.sum())
            bar.update(rows.stop - rows.start)
        if supervised != marker["supervised_tokens"]:
            raise CacheCorruptionError(f"shard {shard}, array loss_mask: {supervised} supervised tokens, "
                                       f"marker says {marker['supervised_tokens']}")
    bar.close()
    if reader.loc.exists(HEAD_FILE):
        try:
            head = reader.head_tensors()
        except SafetensorError as e:
            raise CacheCorruptionError(f"{HEAD_FILE}: {e}") from e
        for name in ("embed_tokens", "lm_head"):
            if tuple(head[name].shape) != (m.target.vocab_size, m.target.hidden_size):
                raise CacheCorruptionError(f"{HEAD_FILE}: {name} has shape {tuple(head[name].shape)}")
    return {"shards": len(reader.shards), "samples": len(reader), "tokens": total_tokens,
            "uncommitted_shards": reader.uncommitted, "ok": True}
