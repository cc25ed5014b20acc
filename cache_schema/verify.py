"""Full integrity check of a cache: every chunk's presence and checksum, each shard's bookkeeping against its
marker, the target files against their checksums, and the committed shards against `summary.json`."""

from tqdm import tqdm

from cache_schema.layout import HEAD_FILE, CacheCorruptionError
from cache_schema.reader import CacheReader

# Token rows read per step; bounded so verifying a large shard never holds it whole in memory.
ROWS_PER_READ = 4096


def verify(url: str, progress: bool = True) -> dict:
    """Raise CacheCorruptionError naming the first bad shard, array or file; otherwise return a short report."""
    reader = CacheReader(url)
    m = reader.manifest
    missing = reader.missing_shards()
    if missing:
        raise CacheCorruptionError(f"{url}: {len(missing)} shards that summary.json lists are not committed "
                                   f"({sum(missing.values())} samples): {', '.join(sorted(missing))}")
    token_arrays = list(m.token_arrays())
    total_tokens = reader.stats["tokens"]
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="verify", disable=not progress)
    for shard in reader.shards:
        marker = reader.markers[shard]
        reader.offsets(shard)  # opening checks shapes and chunk presence; offsets and meta check their counts
        reader.metas(shard)
        reader.read(shard, "token_freq")
        supervised = 0
        for start in range(0, marker["tokens"], ROWS_PER_READ):
            rows = slice(start, min(start + ROWS_PER_READ, marker["tokens"]))
            for name in token_arrays:
                block = reader.read(shard, name, rows)
                if name == "loss_mask":
                    supervised += int(block.sum())
            bar.update(rows.stop - rows.start)
        if supervised != marker["supervised_tokens"]:
            raise CacheCorruptionError(f"shard {shard}, array loss_mask: {supervised} supervised tokens, "
                                       f"marker says {marker['supervised_tokens']}")
    bar.close()
    files = []
    if reader.loc.exists(HEAD_FILE):
        head = reader.head_tensors()
        for name in ("embed_tokens", "lm_head"):
            if tuple(head[name].shape) != (m.target.vocab_size, m.target.hidden_size):
                raise CacheCorruptionError(f"{HEAD_FILE}: {name} has shape {tuple(head[name].shape)}")
        files = [HEAD_FILE, *reader.check_tokenizer()]
    return {"shards": len(reader.shards), "samples": len(reader), "tokens": total_tokens,
            "uncommitted_shards": reader.uncommitted, "checked_files": len(files), "ok": True}
