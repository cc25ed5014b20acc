"""Generate real webdataset `.tar` shards of image-text conversations in the LLaVA `conversations` format.

Each sample is `KEY.json` plus its images as `KEY.<i>.jpg` / `KEY.<i>.png`; the json lists those extensions
under `images` in the order of the `<image>` placeholders. The mix covers single-image, multi-image,
multi-turn and text-only samples; answers come in the layouts of `tools.corpus.answer` (blank-line
paragraphs, lists, sometimes a leading newline). Deterministic for a seed.

    python -m tools.demo_shards OUT_DIR --shards 2 --samples 16
"""

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from tools.corpus import answer, sentence


def random_image(rng: random.Random, fmt: str) -> bytes:
    w, h = rng.randint(40, 120), rng.randint(40, 120)
    gen = np.random.default_rng(rng.randrange(2**32))
    base = gen.integers(0, 255, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = (base + 60 * np.sin(xx[..., None] / rng.uniform(3, 12) + gen.uniform(0, 6, 3))
              + 60 * np.cos(yy[..., None] / rng.uniform(3, 12)))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else "PNG")
    return buf.getvalue()


def conversation(rng: random.Random, kind: str) -> tuple[list[dict], int]:
    """Return (LLaVA turns, number of images). `kind`: single, multi_image, multi_turn or text."""
    n_images = {"single": 1, "multi_image": 2, "multi_turn": 1, "text": 0}[kind]
    n_turns = 3 if kind == "multi_turn" else 1
    turns = []
    for t in range(n_turns):
        question = sentence(rng)
        if t == 0 and n_images:
            question = "\n".join(["<image>"] * n_images) + "\n" + question
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": answer(rng)})
    return turns, n_images


KINDS = ("single", "multi_image", "multi_turn", "text")


def write_shards(out_dir: Path, shards: int = 2, samples: int = 16, seed: int = 0,
                 prefix: str = "train") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for s in range(shards):
        path = out_dir / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(samples):
                kind = KINDS[(s * samples + i) % len(KINDS)]
                turns, n_images = conversation(rng, kind)
                record = {"__key__": f"{prefix}{s:03d}_{i:05d}"}
                names = []
                for k in range(n_images):
                    fmt = rng.choice(["jpg", "png"])
                    record[f"{k}.{fmt}"] = random_image(rng, fmt)
                    names.append(f"{k}.{fmt}")
                record["json"] = json.dumps({"conversations": turns, "images": names}).encode()
                sink.write(record)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_shards(args.out_dir, args.shards, args.samples, args.seed):
        print(path)


if __name__ == "__main__":
    main()
