"""Full integrity check of a cache: every chunk's presence and checksum, each shard's bookkeeping against its
marker, every token's id, mask and positions against what a sample can hold, the target files against their
checksums, and the committed shards against `summary.json`."""

import numpy as np
from tqdm import tqdm

from cache_schema.layout import HEAD_FILE, CacheCorruptionError
from cache_schema.reader import CacheReader

# Token rows read per step; bounded so verifying a large shard never holds it whole in memory.
ROWS_PER_READ = 4096


def value_rules(vocab: int) -> dict:
    """What no sample can hold, per token-axis array: name -> (what its values must be, a function of a block
    of rows and each row's sample length telling the rows that break it)."""
    return {
        "input_ids": (f"a token id in [0, {vocab})", lambda ids, length: (ids < 0) | (ids >= vocab)),
        "loss_mask": ("0 or 1", lambda mask, length: mask > 1),
        "position_ids": ("position ids in [0, the sample's length)",
                         lambda pos, length: ((pos < 0) | (pos >= length[:, None])).any(axis=1)),
    }


def check_values(shard: str, blocks: dict[str, np.ndarray], start: int, offsets: np.ndarray, rules: dict) -> None:
    """Raise CacheCorruptionError naming the first token, with its sample and position in it, that holds an
    impossible value in any of `blocks` (array name -> its rows from `start` on)."""
    samples = np.searchsorted(offsets, np.arange(start, start + len(blocks["input_ids"])), side="right") - 1
    lengths = np.diff(offsets)[samples]
    for name, (what, breaks) in rules.items():
        bad = np.flatnonzero(breaks(blocks[name], lengths))
        if bad.size:
            row, sample = int(bad[0]), int(samples[bad[0]])
            raise CacheCorruptionError(f"shard {shard}, array {name}: token {start + row} (sample {sample}, position "
                                       f"{start + row - int(offsets[sample])}) holds {blocks[name][row].tolist()}; "
                                       f"it must be {what}")


def check_shard(reader: CacheReader, shard: str, rules: dict, bar: tqdm) -> None:
    """Every token-axis row of a shard against `rules`, its meta and token frequencies, and its supervised count
    against its marker."""
    marker = reader.markers[shard]
    offsets = reader.offsets(shard)  # opening checks shapes and chunk presence; offsets and meta their counts
    reader.metas(shard)
    reader.read(shard, "token_freq")
    supervised = 0
    for start in range(0, marker["tokens"], ROWS_PER_READ):
        rows = slice(start, min(start + ROWS_PER_READ, marker["tokens"]))
        blocks = {name: reader.read(shard, name, rows) for name in reader.manifest.token_arrays()}
        check_values(shard, blocks, rows.start, offsets, rules)
        supervised += int(blocks["loss_mask"].sum())
        bar.update(rows.stop - rows.start)
    if supervised != marker["supervised_tokens"]:
        raise CacheCorruptionError(f"shard {shard}, array loss_mask: {supervised} supervised tokens, "
                                   f"marker says {marker['supervised_tokens']}")


def verify(url: str, progress: bool = True) -> dict:
    """Raise CacheCorruptionError naming the first bad shard, array or file; otherwise return a short report."""
    reader = CacheReader(url)
    m = reader.manifest
    missing = reader.missing_shards()
    if missing:
        raise CacheCorruptionError(f"{url}: {len(missing)} shards that summary.json lists are not committed "
                                   f"({sum(missing.values())} samples): {', '.join(sorted(missing))}")
    rules = value_rules(m.target.vocab_size)
    total_tokens = reader.stats["tokens"]
    # Closed on a failure too, so that the error is printed on a line of its own.
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="verify", disable=not progress) as bar:
        for shard in reader.shards:
            check_shard(reader, shard, rules, bar)
    files = []
    if reader.loc.exists(HEAD_FILE):
        head = reader.head_tensors()
        for name in ("embed_tokens", "lm_head"):
            if tuple(head[name].shape) != (m.target.vocab_size, m.target.hidden_size):
                raise CacheCorruptionError(f"{HEAD_FILE}: {name} has shape {tuple(head[name].shape)}")
        files = [HEAD_FILE, *reader.check_tokenizer()]
    return {"shards": len(reader.shards), "samples": len(reader), "tokens": total_tokens,
            "uncommitted_shards": reader.uncommitted, "checked_files": len(files), "ok": True}
