"""The record layouts people bring, turned into the sample JSON and image members `extract` reads (formats.py).

Recognised, per record:
- `texts: [{user, assistant}, ...]` with `images` (HuggingFaceM4/the_cauldron): the images open the first question;
- chat `messages` whose content parts carry their image inline: `{"type": "image", "image": PATH | URI}` (Qwen-VL
  fine-tuning data) or `{"type": "image_url", "image_url": {"url": DATA_URI | PATH}}` (OpenAI);
- chat `messages` with `<image>` tags in string content and an `images` list (LLaMA-Factory, ms-swift), or image
  parts without a source whose images are listed under `images`;
- LLaVA `conversations` (with `<image>` tags, or without them: the images then open the first question).

An image is a path (relative to the image folder, or `file://`), a `data:` URI, a PIL image or `datasets`' own
`{"bytes", "path"}`; its bytes are kept as they are. A path that does not exist is still named, so that extraction
skips the sample as `missing_image`. What cannot be converted raises `Unconvertible` with a reason the converter
counts: `remote_image` (an http(s) URL: nothing is fetched), `bad_data_uri`, `unknown_layout`.
"""

import base64
import binascii
import io
from pathlib import Path

from PIL import Image


class Unconvertible(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _ext(data: bytes, fallback: str) -> str:
    try:
        fmt = (Image.open(io.BytesIO(data)).format or "").lower()
    except Exception:  # noqa: BLE001 - not an image PIL knows: extraction will say so (corrupt_image)
        fmt = ""
    return {"jpeg": "jpg", "": fallback or "jpg"}.get(fmt, fmt)


def image_member(ref, image_dir: Path | None) -> tuple[str, bytes | None]:
    """(extension, bytes) of one image reference; bytes None for a file that does not exist."""
    if isinstance(ref, Image.Image):
        buf = io.BytesIO()
        fmt = (ref.format or "PNG").upper()
        ref.save(buf, format=fmt)
        return ("jpg" if fmt == "JPEG" else fmt.lower()), buf.getvalue()
    if isinstance(ref, dict) and (ref.get("bytes") or ref.get("path")):  # datasets' Image(decode=False)
        if ref.get("bytes"):
            return _ext(ref["bytes"], Path(str(ref.get("path") or "")).suffix.lstrip(".").lower()), ref["bytes"]
        ref = ref["path"]
    if not isinstance(ref, str) or not ref:
        raise Unconvertible("unknown_layout", f"an image reference of type {type(ref).__name__}")
    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if ";base64" not in head:
            raise Unconvertible("bad_data_uri", "only base64 data URIs hold image bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise Unconvertible("bad_data_uri", str(e)) from e
        return _ext(data, head[5:].split(";")[0].rsplit("/", 1)[-1]), data
    if ref.startswith(("http://", "https://")):
        raise Unconvertible("remote_image", ref[:100])
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    if not path.is_absolute() and image_dir is not None:
        path = image_dir / path
    ext = path.suffix.lstrip(".").lower() or "jpg"
    return ext, path.read_bytes() if path.is_file() else None


def _inline_image(part: dict):
    """The image a content part carries itself, or None for a bare image placeholder."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return part.get("image", part.get("image_url"))


def normalise(rec: dict) -> tuple[dict, list]:
    """(the sample JSON, its image references in placeholder order) of one record in any layout above."""
    if not isinstance(rec, dict):
        raise Unconvertible("unknown_layout", f"a record of type {type(rec).__name__}")
    keep = {k: v for k, v in rec.items() if k not in ("image", "images", "texts", "messages", "conversations")}
    listed = rec.get("images", rec.get("image")) or []
    listed = listed if isinstance(listed, list) else [listed]
    if isinstance(rec.get("texts"), list):  # the_cauldron
        messages = []
        for i, t in enumerate(rec["texts"]):
            if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not isinstance(t.get("assistant"), str):
                raise Unconvertible("unknown_layout", "texts entries need 'user' and 'assistant' strings")
            images = [{"type": "image"} for _ in listed] if i == 0 else []
            messages += [{"role": "user", "content": images + [{"type": "text", "text": t["user"]}]},
                         {"role": "assistant", "content": [{"type": "text", "text": t["assistant"]}]}]
        return {**keep, "messages": messages}, listed
    if isinstance(rec.get("messages"), list):
        inline, messages = [], []
        for m in rec["messages"]:
            if not isinstance(m, dict):
                raise Unconvertible("unknown_layout", "messages entries must be objects")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for p in content:
                    if isinstance(p, dict) and p.get("type") in ("image", "image_url"):
                        source = _inline_image(p)
                        if source is not None:
                            inline.append(source)
                        parts.append({"type": "image"})
                    else:
                        parts.append(p)
                content = parts
            messages.append({**m, "content": content})
        if inline and listed:
            raise Unconvertible("unknown_layout", "images both inline in the messages and listed under 'images'")
        return {**keep, "messages": messages}, inline or listed
    if isinstance(rec.get("conversations"), list):  # LLaVA / ShareGPT; untagged images open the first question
        return {**keep, "conversations": rec["conversations"]}, listed
    raise Unconvertible("unknown_layout", "no 'texts', 'messages' or 'conversations' list")
