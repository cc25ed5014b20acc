"""The data layouts users bring, each built the way its public source documents it, converted with one command and
read by extraction with their images kept and in order; what cannot be converted is counted by reason."""

import base64
import io
import json
import tarfile

import numpy as np
from PIL import Image

from cache_schema import CacheReader
from extract.convert import convert_hf, convert_json
from extract.run import run as extract
from helpers import extract_config

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(colour: str) -> str:
    return "data:image/png;base64," + base64.b64encode(png(colour)).decode()


def shard_samples(out_dir) -> dict[str, tuple[dict, list[str]]]:
    """key -> (its JSON, the colour of each of its images in the order the JSON lists them)."""
    out = {}
    for path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(data)
                colours = []
                for image in meta["images"]:
                    pixel = Image.open(io.BytesIO(members[f"{key}.{image}"])).convert("RGB").getpixel((5, 5))
                    colours.append(next(c for c, rgb in COLOURS.items() if np.allclose(pixel, rgb, atol=8)))
                out[key] = (meta, colours)
    return out


def test_every_layout_converts_with_its_images_in_order_and_extraction_reads_them(tmp_path, tiny_targets):
    import datasets

    images = tmp_path / "images"
    images.mkdir()
    for colour in COLOURS:
        (images / f"{colour}.png").write_bytes(png(colour))
    records = [
        # OpenAI chat: image_url parts holding a data URI and a file path.
        {"id": "openai", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri("green")}},
                                         {"type": "image_url", "image_url": {"url": "red.png"}},
                                         {"type": "text", "text": "Which is first?"}]},
            {"role": "assistant", "content": "The green one."}]},
        # Qwen-VL fine-tuning data: image parts naming their file inline (file:// URI and relative path).
        {"id": "qwen", "messages": [
            {"role": "user", "content": [{"type": "image", "image": f"file://{images / 'blue.png'}"},
                                         {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
            {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "And?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]},
        # LLaMA-Factory / ms-swift: <image> tags in string content, an images list.
        {"id": "llamafactory", "messages": [{"role": "user", "content": "<image><image>Compare them."},
                                             {"role": "assistant", "content": "Red, then green."}],
         "images": ["red.png", "green.png"]},
        # LLaVA without <image> tags: the image opens the first question.
        {"id": "llava", "image": "blue.png", "conversations": [{"from": "human", "value": "What is it?"},
                                                               {"from": "gpt", "value": "A blue square."}]},
        # Not convertible: a remote image (nothing is fetched), a broken data URI, no conversation at all.
        {"id": "remote", "messages": [{"role": "user", "content": [{"type": "image", "image": "https://x/y.png"}]},
                                      {"role": "assistant", "content": "?"}]},
        {"id": "broken", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]},
            {"role": "assistant", "content": "?"}]},
        {"id": "odd", "prompt": "no turns here"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    counts = convert_json(tmp_path / "data.jsonl", images, tmp_path / "wds")
    assert counts == {"written": 4, "remote_image": 1, "bad_data_uri": 1, "unknown_layout": 1}
    # HuggingFaceM4/the_cauldron: an images column and texts of user/assistant pairs.
    cauldron = datasets.Dataset.from_list([{"images": [Image.open(images / "green.png"), Image.open(images / "red.png")],
                                           "texts": [{"user": "Colours?", "assistant": "Green, red.", "source": "s"},
                                                     {"user": "Sure?", "assistant": "Yes.", "source": "s"}]}])
    assert convert_hf(cauldron, tmp_path / "wds_hf", prefix="cauldron") == {"written": 1}

    got = {**shard_samples(tmp_path / "wds"), **shard_samples(tmp_path / "wds_hf")}
    assert {k: colours for k, (_, colours) in got.items()} == {
        "openai": ["green", "red"], "qwen": ["blue", "red"], "llamafactory": ["red", "green"], "llava": ["blue"],
        "sample000000000": ["green", "red"]}
    shards = sorted(tmp_path.glob("wds*/*.tar"))
    cfg = extract_config(tmp_path / "cache", shards, tiny_targets / "qwen3_vl")
    cfg.generation.regenerate = False  # the records' own answers: a random tiny target would cut later turns
    summary = extract(cfg)
    assert summary["samples"] == 5 and summary["skipped"] == {}
    reader = CacheReader(str(tmp_path / "cache"))
    turns = {reader[i].key: (reader[i].meta["num_images"], reader[i].meta["assistant_turns"]) for i in range(5)}
    assert turns == {"openai": (2, 1), "qwen": (2, 2), "llamafactory": (2, 1), "llava": (1, 1),
                     "sample000000000": (2, 2)}
