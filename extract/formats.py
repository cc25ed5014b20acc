"""Per-sample conversation formats, normalised to chat messages with image parts in placeholder order.

Accepted: LLaVA `conversations` (`from: human/gpt/system`, `<image>` placeholders), chat `messages` (string
content or lists of `{type: image}` / `{type: text}` parts) and text-only variants of both. An assistant turn
may carry `token_ids`: the ids a serving engine generated for it (see docs/regeneration.md). Problems raise
`SkipSample` with a reason that the run counts; nothing here touches the model.
"""

import io
import json
from dataclasses import dataclass, field

from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# An image whose decoding would take more memory than this is skipped before it is decoded (its header says its
# size and mode): 1 GiB lets scans and posters through (an 8000 x 8000 RGB PNG costs 192 MB) and bounds what one
# member of a tar can make a process allocate. The processors shrink large images afterwards anyway.
MAX_IMAGE_BYTES = 1 << 30
BYTES_PER_BAND = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}


def decoded_bytes(img: Image.Image) -> int:
    """What decoding an opened (not yet loaded) image costs: its own bands, plus the RGB copy to_rgb makes."""
    width, height = img.size
    own = width * height * len(img.getbands()) * BYTES_PER_BAND.get(img.mode, 1)
    return own + (0 if img.mode == "RGB" else width * height * 3)


class SkipSample(Exception):
    """Why one conversation is left out: raised where it is found, counted by `reason` by the caller's on_skip."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def guarded(reason: str, fn, *args):
    """`fn(*args)`, any failure of it (but a SkipSample, which keeps its own reason) becoming SkipSample(reason):
    what one conversation's data makes the parser, the template, the tokenizer or the processor do must never end
    a run, and every rerun would die at the same sample."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - deliberately any: the data decides what is raised
        if machine_error(e):
            raise
        raise as_skip(reason, e) from e


def machine_error(error: Exception) -> bool:
    """An error of the machine, not of one conversation's data (out of memory, a device fault, a serving engine
    that cannot run the target): skipping the sample would hide it, depend on memory pressure, and with a poisoned
    device skip every later one."""
    return (isinstance(error, MemoryError)
            or type(error).__name__ in ("OutOfMemoryError", "AcceleratorError", "EngineError")
            or "CUDA error" in str(error))


def as_skip(reason: str, error: Exception) -> SkipSample:
    """`error` as a SkipSample: itself if it is one, else SkipSample(reason) naming it."""
    if isinstance(error, SkipSample):
        return error
    return SkipSample(reason, f"{type(error).__name__}: {str(error)[:300]}")


@dataclass
class Conversation:
    key: str
    source: str
    messages: list[dict]  # {"role", "content": [{"type": "text"|"image", ...}]}
    images: list[Image.Image] = field(default_factory=list)
    index: int = 0  # its place among the readable conversations of its shard, the same on every read

    @property
    def assistant_turns(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB as vLLM's image loader gives it to the processor (the target must see in training what
    it is shown when served): the EXIF orientation applied (transformers' load_image does the same), any
    transparency (RGBA, LA, PA, a palette or tRNS entry) composited on white, every other mode by PIL's own
    convert (16-bit and float modes clip, as in both loaders)."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.split()[-1])
        return canvas
    return img.convert("RGB")


def decode_image(data: bytes, name: str, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """Decode one image member; what decoding it would cost is checked from the header first."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipSample("image_too_large", f"{name}: {e}") from e
    except Exception as e:  # PIL raises many types for truncated or garbage bytes
        raise SkipSample("corrupt_image", f"{name}: {e}") from e
    width, height = img.size
    cost = decoded_bytes(img)
    if cost > max_bytes:
        raise SkipSample("image_too_large", f"{name}: {width}x{height} {img.mode} would take {cost >> 20} MiB to "
                                            f"decode, above {max_bytes >> 20} MiB")
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:
        raise SkipSample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from e


def _split_placeholders(text: str) -> list[dict]:
    pieces = text.split("<image>")
    parts = []
    for i, chunk in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        if len(pieces) > 1:
            chunk = chunk.strip("\n")
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _with_token_ids(message: dict, raw: dict) -> dict:
    """Keep an assistant turn's `token_ids` (the ids a serving engine generated for it), checked."""
    ids = raw.get("token_ids")
    if ids is None:
        return message
    if message["role"] != "assistant":
        raise SkipSample("unknown_format", "token_ids on a non-assistant turn")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise SkipSample("unknown_format", "token_ids must be a list of non-negative token ids")
    return {**message, "token_ids": ids}


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise SkipSample("unknown_format", f"{what} must be a string, not {type(value).__name__}")
    return value


def _llava(turns: list) -> list[dict]:
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SkipSample("unknown_format", "conversations entries need 'from' and 'value'")
        role = ROLES.get(_text(turn["from"], "'from'").lower())
        if role is None:
            raise SkipSample("unknown_format", f"unknown speaker {turn['from']!r}")
        content = _split_placeholders(_text(turn["value"], "'value'"))
        messages.append(_with_token_ids({"role": role, "content": content}, turn))
    return messages


def _chat(items: list) -> list[dict]:
    messages = []
    for m in items:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise SkipSample("unknown_format", "messages entries need a role of system/user/assistant")
        content = m.get("content")
        if isinstance(content, str):
            parts = _split_placeholders(content)
        elif isinstance(content, list):
            parts = []
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind in ("image", "image_url"):
                    parts.append({"type": "image"})
                elif kind == "text":
                    parts.append({"type": "text", "text": _text(p.get("text"), "a text part's 'text'")})
                else:
                    raise SkipSample("unknown_format", f"content part of type {kind!r}")
        else:
            raise SkipSample("unknown_format", "message content must be a string or a list of parts")
        messages.append(_with_token_ids({"role": m["role"], "content": parts}, m))
    return messages


def image_names(record: dict, meta: dict) -> list[str]:
    """Extensions in the sample that hold its images, in placeholder order."""
    listed = meta.get("images", meta.get("image"))
    if isinstance(listed, str):
        listed = [listed]
    if listed is not None and not (isinstance(listed, list) and all(isinstance(n, str) for n in listed)):
        raise SkipSample("unknown_format", "'images' must be a member name or a list of member names")
    if listed:
        return [n if n in record else n.rsplit("/", 1)[-1] for n in listed]
    return sorted(k for k in record if k.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)


def parse_sample(record: dict, source: str, fmt: str = "auto") -> Conversation:
    """A raw webdataset record (`__key__`, `json`, image bytes by extension) -> Conversation."""
    key = record.get("__key__", "?")
    raw = record.get("json")
    if raw is None:
        raise SkipSample("invalid_json", "no .json member")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # nested past the recursion limit
        raise SkipSample("invalid_json", f"{type(e).__name__}: {str(e)[:200]}") from e
    if not isinstance(meta, dict):
        raise SkipSample("unknown_format", "top-level json is not an object")
    if fmt in ("auto", "llava") and isinstance(meta.get("conversations"), list):
        messages = _llava(meta["conversations"])
    elif fmt in ("auto", "messages") and isinstance(meta.get("messages"), list):
        messages = _chat(meta["messages"])
    else:
        raise SkipSample("unknown_format", f"no {'conversations or messages' if fmt == 'auto' else fmt} list")
    messages = [m for m in messages if m["content"] or m["role"] == "assistant"]
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipSample("no_assistant_turn")
    if messages[0]["role"] == "assistant":
        raise SkipSample("unknown_format", "conversation starts with an assistant turn")

    wanted = sum(p["type"] == "image" for m in messages for p in m["content"])
    names = image_names(record, meta)
    if wanted == 0 and names and meta.get("images", meta.get("image")):
        # Listed images without placeholders: the LLaVA convention puts them before the first question.
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"][:0] = [{"type": "image"} for _ in names]
        wanted = len(names)
    if wanted != len(names):
        raise SkipSample("image_count_mismatch", f"{wanted} <image> placeholders, {len(names)} images")
    unlisted = sorted(k for k in record if k.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and k not in names)
    if unlisted:
        raise SkipSample("unreferenced_image", f"{', '.join(unlisted)} not in the sample's image list")
    missing = [n for n in names if n not in record]
    if missing:
        raise SkipSample("missing_image", ", ".join(missing))
    images = [decode_image(record[n], n) for n in names]
    return Conversation(key=key, source=source, messages=messages, images=images)
