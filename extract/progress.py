"""The progress bar of a rank's shards: conversations read against an estimated total, with an ETA."""

from tqdm import tqdm

from cache_schema import CacheWriter
from cache_schema.layout import COMMIT_MARKER, MARKER_SCHEMA, SHARDS_DIR


class ShardProgress:
    """A bar over conversations read (kept or skipped) against an estimate of this rank's total: its shards
    times the mean conversations per shard, from the shards this run finished or, before the first one, the
    cache's committed shards. So a long run shows a total and an ETA from the first minutes on."""

    def __init__(self, writer: CacheWriter, shards: int, rank: int, enabled: bool, stage: str = "extract"):
        self.shards, self.done_shards, self.read, self.read_at_shard_end = shards, 0, 0, 0
        self.skipped = 0  # skips of the current shard already counted in `read`
        committed = sorted(writer.committed())[:8] if enabled else []
        sizes = [conversations_in(writer.loc.read_json(SHARDS_DIR, name, COMMIT_MARKER, schema=MARKER_SCHEMA))
                 for name in committed]
        self.prior = sum(sizes) / len(sizes) if sizes else None
        self.bar = tqdm(unit="conv", desc=f"{stage}[{rank}]", disable=not enabled, position=rank,
                        total=self._estimate())

    def _estimate(self) -> int | None:
        per_shard = self.read_at_shard_end / self.done_shards if self.done_shards else self.prior
        if per_shard is None:
            return None
        return max(self.read, round(per_shard * self.shards))

    def update(self, kept: int, skipped: int, **postfix) -> None:
        """`kept` more conversations cached; `skipped`: the shard's skips so far."""
        read = kept + skipped - self.skipped
        self.read, self.skipped = self.read + read, skipped
        self.bar.update(read)
        self.bar.set_postfix(shard=f"{self.done_shards + 1}/{self.shards}", skipped=skipped, **postfix)

    def shard_done(self, skipped: int) -> None:
        """The shard is committed, `skipped` its skips in all (some may follow its last batch)."""
        self.update(0, skipped)
        self.skipped = 0
        self.done_shards += 1
        self.read_at_shard_end = self.read
        self.bar.total = self._estimate()
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def conversations_in(marker: dict) -> int:
    return marker["samples"] + sum((marker.get("skipped") or {}).values())
