"""Where a cache lives: a plain path or any fsspec URL (file://, memory://, s3://, ...)."""

import hashlib
import json
import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache_schema.layout import COMMIT_MARKER, SHARDS_DIR

# Every chunk ends with a crc32c so that any flipped byte is caught on read, compressed or not.
COMPRESSIONS = {
    "none": lambda: [Crc32cCodec()],
    "zstd": lambda: [ZstdCodec(level=3), Crc32cCodec()],
    "blosc_lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()],
}


def compressors(name: str) -> list:
    if name not in COMPRESSIONS:
        raise ValueError(f"storage.compression={name!r}; choose from {sorted(COMPRESSIONS)}")
    return COMPRESSIONS[name]()


class Location:
    """A cache root: joins paths, reads and writes small files atomically, opens zarr groups."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.is_url = "://" in self.url

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str):
        with self.fs.open(self.path(*parts), "r") as f:
            return json.load(f)

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        """Write to a temporary name, then rename: readers see the old file or the whole new one."""
        final = self.path(*parts)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    def check_writable(self) -> None:
        """Write and remove a probe file, so a read-only destination is refused before any long work."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        except OSError as e:
            raise ValueError(f"out={self.url} is not writable: {type(e).__name__}: {e}") from e

    def sha256(self, *parts: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(self.path(*parts), "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        return digest.hexdigest()

    def files_under(self, *parts: str) -> set[str]:
        """Every file below a folder, as paths relative to it, from one listing."""
        base = self.path(*parts)
        return {p[len(base) + 1:] for p in self.fs.find(base)} if self.fs.exists(base) else set()

    def absent(self, names: list[str], *parts: str) -> list[str]:
        """Those of `names` (paths below the folder `parts`) that do not exist.

        A local disk answers one stat per file (bench: 3x faster than walking zarr's one-folder-per-chunk
        tree); an object store answers one listing, instead of a request per file.
        """
        if isinstance(self.fs, LocalFileSystem):
            base = self.path(*parts)
            return [n for n in names if not os.path.exists(f"{base}/{n}")]
        present = self.files_under(*parts)
        return [n for n in names if n not in present]

    def write_json_atomic(self, obj, *parts: str) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def open_shard(self, name: str, mode: str) -> zarr.Group:
        # zarr's fsspec store does not create local directories, so file:// goes through its local store.
        local = isinstance(self.fs, LocalFileSystem)
        where = self.path(SHARDS_DIR, name) if local else f"{self.url}/{SHARDS_DIR}/{name}"
        return zarr.open_group(where, mode=mode)

    def shard_names(self) -> tuple[list[str], list[str]]:
        """(committed, uncommitted) shard names, each sorted."""
        base = self.path(SHARDS_DIR)
        if not self.fs.exists(base):
            return [], []
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)
                       if self.fs.isdir(p))
        committed = [n for n in names if self.fs.exists(self.path(SHARDS_DIR, n, COMMIT_MARKER))]
        return committed, [n for n in names if n not in committed]

    def remove_shard(self, name: str) -> None:
        self.fs.rm(self.path(SHARDS_DIR, name), recursive=True)

    def du(self, *parts: str) -> int:
        path = self.path(*parts)
        return int(self.fs.du(path)) if self.fs.exists(path) else 0
