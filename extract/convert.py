"""Convert the layouts users have into webdataset shards that `extract` reads.

    python -m extract.convert json DATA.json[l] IMAGE_DIR OUT_DIR [--samples-per-shard 1000]
    python -m extract.convert hf DATASET_PATH_OR_ID OUT_DIR [--split train] [--image-column images]

`json`: a LLaVA-style JSON list or JSONL file whose records name images (`image`: str or list) relative to
IMAGE_DIR. `hf`: a Hugging Face `datasets` dataset (saved to disk or loadable by name) with a
`conversations` or `messages` column and an image column of PIL images. Images are stored under
`KEY.<i>.<ext>` (files keep their bytes, `datasets` images are encoded in their own format); a record
whose image file is missing still names it, so `extract` skips it with reason `missing_image` and nothing
silently disappears.
"""

import argparse
import io
import json
from pathlib import Path

import webdataset as wds


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


def convert_json(data: Path, image_dir: Path, out_dir: Path, per_shard: int = 1000, prefix: str = "train") -> int:
    sink = ShardSink(out_dir, prefix, per_shard)
    seen = set()
    for i, rec in _records_from_json(data):
        key = _safe_key(rec.get("id"), i)
        if key in seen:
            key = f"{key}_{i}"
        seen.add(key)
        listed = rec.get("image", rec.get("images")) or []
        listed = [listed] if isinstance(listed, str) else list(listed)
        names, images = [], {}
        for k, name in enumerate(listed):
            path = image_dir / name
            names.append(f"{k}.{path.suffix.lstrip('.').lower() or 'jpg'}")
            if path.is_file():
                images[names[-1]] = path.read_bytes()
        meta = {k: v for k, v in rec.items() if k not in ("image", "images")}
        sink.write(key, meta, names, images)
    return sink.close()


def convert_hf(dataset, out_dir: Path, image_column: str = "images", per_shard: int = 1000,
               prefix: str = "train") -> int:
    sink = ShardSink(out_dir, prefix, per_shard)
    for i, row in enumerate(dataset):
        meta = {k: v for k, v in row.items() if k in ("conversations", "messages", "id")}
        imgs = row.get(image_column) or []
        imgs = imgs if isinstance(imgs, list) else [imgs]
        images = {}
        for k, img in enumerate(imgs):
            buf = io.BytesIO()
            fmt = (img.format or "PNG").upper()
            img.save(buf, format=fmt)
            images[f"{k}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"] = buf.getvalue()
        sink.write(_safe_key(row.get("id"), i), meta, list(images), images)
    return sink.close()


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
    for p in (j, h):
        p.add_argument("--samples-per-shard", type=int, default=1000)
        p.add_argument("--prefix", default="train")
    args = parser.parse_args()
    if args.kind == "json":
        n = convert_json(args.data, args.image_dir, args.out_dir, args.samples_per_shard, args.prefix)
    else:
        import datasets

        path = Path(args.dataset)
        ds = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(args.dataset)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[args.split]
        n = convert_hf(ds, args.out_dir, args.image_column, args.samples_per_shard, args.prefix)
    print(f"wrote {n} samples to {args.out_dir}")


if __name__ == "__main__":
    main()
