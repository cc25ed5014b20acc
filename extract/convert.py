"""Convert the layouts users have into webdataset shards that `extract` reads.

    python -m extract.convert json DATA.json[l] IMAGE_DIR OUT_DIR [--samples-per-shard 1000]
    python -m extract.convert hf DATASET_PATH_OR_ID OUT_DIR [--split train] [--image-column images]

`json`: a JSON list or JSONL file of records; `hf`: a Hugging Face `datasets` dataset (saved to disk or loadable
by name). Either may hold any layout of extract/layouts.py: LLaVA `conversations`, chat `messages` (OpenAI
`image_url` parts with data URIs or paths, Qwen-VL `{"type": "image", "image": PATH}` parts, LLaMA-Factory `<image>`
tags with an `images` list) or the_cauldron's `texts` with `images`; paths are relative to IMAGE_DIR, and in `hf` an
image column (`--image-column`) of PIL images or paths. Images are stored under `KEY.<i>.<ext>` in placeholder order,
keeping their bytes (PIL images are encoded in their own format); a record whose image file is missing still names
it, so `extract` skips it with reason `missing_image`. A record that cannot be converted is counted by reason
(printed at the end) and left out.
"""

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import webdataset as wds

from extract.layouts import Unconvertible, image_member, normalise

log = logging.getLogger("extract.convert")


def _records_from_json(path: Path):
    text = path.read_text()
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines()):
            if line.strip():
                yield line_no, json.loads(line)
    else:
        yield from enumerate(json.loads(text))


class ShardSink:
    """Writes records into numbered shards of at most `per_shard` samples."""

    def __init__(self, out_dir: Path, prefix: str, per_shard: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.pattern = str(out_dir / f"{prefix}-%06d.tar")
        self.writer = wds.ShardWriter(self.pattern, maxcount=per_shard, verbose=0)
        self.count = 0

    def write(self, key: str, meta: dict, names: list[str], images: dict[str, bytes]) -> None:
        """`names`: every image the sample refers to, in order; `images`: the bytes of those that exist."""
        record = {"__key__": key, "json": json.dumps({**meta, "images": names}).encode(), **images}
        self.writer.write(record)
        self.count += 1

    def close(self) -> int:
        self.writer.close()
        return self.count


def _safe_key(raw, fallback: int) -> str:
    key = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(raw)) if raw is not None else ""
    return key or f"sample{fallback:09d}"


def _write(sink: ShardSink, key: str, rec: dict, image_dir: Path | None, skipped: Counter) -> None:
    try:
        meta, refs = normalise(rec)
        members = [image_member(ref, image_dir) for ref in refs]
    except Unconvertible as e:
        skipped[e.reason] += 1
        log.warning("record %s not converted: %s", key, e)
        return
    names = [f"{k}.{ext}" for k, (ext, _) in enumerate(members)]
    sink.write(key, meta, names, {n: data for n, (_, data) in zip(names, members) if data is not None})


def convert_json(data: Path, image_dir: Path, out_dir: Path, per_shard: int = 1000, prefix: str = "train") -> Counter:
    """Every record of a JSON list or JSONL file into shards; {"written": n, reason: records left out, ...}."""
    sink, seen, skipped = ShardSink(out_dir, prefix, per_shard), set(), Counter()
    for i, rec in _records_from_json(data):
        key = _safe_key(rec.get("id") if isinstance(rec, dict) else None, i)
        if key in seen:
            key = f"{key}_{i}"
        seen.add(key)
        _write(sink, key, rec, image_dir, skipped)
    return Counter(written=sink.close()) + skipped


def convert_hf(dataset, out_dir: Path, image_column: str = "images", per_shard: int = 1000,
               prefix: str = "train", image_dir: Path | None = None) -> Counter:
    """Every row of a `datasets` dataset into shards; its images from `image_column` unless its messages carry
    them inline."""
    sink, skipped = ShardSink(out_dir, prefix, per_shard), Counter()
    for i, row in enumerate(dataset):
        rec = {k: v for k, v in row.items() if k in ("conversations", "messages", "texts", "id")}
        images = row.get(image_column)
        if images:
            rec["images"] = images if isinstance(images, list) else [images]
        _write(sink, _safe_key(row.get("id"), i), rec, image_dir, skipped)
    return Counter(written=sink.close()) + skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    j = sub.add_parser("json")
    j.add_argument("data", type=Path)
    j.add_argument("image_dir", type=Path)
    j.add_argument("out_dir", type=Path)
    h = sub.add_parser("hf")
    h.add_argument("dataset")
    h.add_argument("out_dir", type=Path)
    h.add_argument("--split", default="train")
    h.add_argument("--image-column", default="images")
    h.add_argument("--image-dir", type=Path, help="where image paths in the rows are relative to")
    for p in (j, h):
        p.add_argument("--samples-per-shard", type=int, default=1000)
        p.add_argument("--prefix", default="train")
    args = parser.parse_args()
    if args.kind == "json":
        counts = convert_json(args.data, args.image_dir, args.out_dir, args.samples_per_shard, args.prefix)
    else:
        import datasets

        path = Path(args.dataset)
        ds = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(args.dataset)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[args.split]
        counts = convert_hf(ds, args.out_dir, args.image_column, args.samples_per_shard, args.prefix,
                            args.image_dir)
    left = {k: v for k, v in sorted(counts.items()) if k != "written"}
    print(f"wrote {counts['written']} samples to {args.out_dir}; not converted: "
          + (", ".join(f"{k} {v}" for k, v in left.items()) or "none"))


if __name__ == "__main__":
    main()
