"""What a prompt is: the generation settings, and the one renderer that turns a conversation under them into
the prompt of each assistant turn (chat text, images, encoded ids).

`GenerationSettings` is stored whole in the cache manifest (`generation`), so everything that judges a drafter
(tools.spec_decode, the serve check) reads it from the cache and renders with `Prompts` exactly the prompts the
drafter was trained on: the target's own chat template, the cache's system prompt and thinking switch, earlier
assistant turns as the target answered them, the same length limit.
"""

from dataclasses import asdict, dataclass, fields

from extract.formats import Conversation, SkipSample
from extract.target import Target

# Far above any real token's length (Qwen's longest merges are runs of a few dozen spaces or symbols).
MAX_CHARS_PER_TOKEN = 256


@dataclass
class GenerationSettings:
    """How the target is asked and how it answers; two caches built under different settings never mix."""

    regenerate: bool = True  # false keeps the dataset's own answers
    max_new_tokens: int = 1024
    max_length: int = 4096  # conversations longer than this (a prompt or the final sequence) are skipped
    system_prompt: str | None = None  # prepended as a system turn where the conversation has none
    enable_thinking: bool | None = None  # None: the chat template's default
    # false leaves earlier assistant turns unsupervised (only the last turn is the target's own tokens; thinking
    # templates also strip earlier turns' reasoning): see docs/decisions.md
    supervise_history: bool = True

    def check(self) -> None:
        for key in ("max_new_tokens", "max_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"generation.{key}={value!r} must be an integer >= 1")

    def manifest_entry(self, target_dtype: str) -> dict:
        """The manifest's `generation`: these settings plus how the target ran (its dtype, greedy)."""
        return {**asdict(self), "target_dtype": target_dtype, "greedy": True}

    @classmethod
    def from_manifest(cls, generation: dict) -> "GenerationSettings":
        """The settings a cache was extracted with (keys a cache predates keep their defaults)."""
        return cls(**{f.name: generation[f.name] for f in fields(cls) if f.name in generation})


@dataclass
class TurnPrompt:
    """The chat text up to where the model starts writing one assistant turn, and that text's images."""

    text: str
    images: list


class Prompts:
    """Renders, encodes and length-checks the prompts of one target under one `GenerationSettings`."""

    def __init__(self, target: Target, settings: GenerationSettings):
        self.target, self.settings = target, settings
        self.chat = target.traits.chat
        self.suffix = self._generation_suffix()

    def _content(self, parts: list[dict]):
        if self.target.is_vision:
            return parts
        return "".join(p.get("text", "") for p in parts if p["type"] == "text")

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """Messages as the target's chat template writes them, with the settings' system prompt and thinking."""
        msgs = [{"role": m["role"], "content": self._content(m["content"])} for m in messages]
        system = self.settings.system_prompt
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self._content([{"type": "text", "text": system}])})
        thinking = self.settings.enable_thinking
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        return self.target.processor.apply_chat_template(msgs, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt, **kwargs)

    def _generation_suffix(self) -> str:
        """What the generation prompt writes after the assistant header (e.g. "<think>\\n"): template text."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
        with_prompt, without = self.render(probe, True), self.render(probe, False)
        header = self.chat.assistant_header
        if not with_prompt.startswith(without + header):
            raise ValueError(f"chat template: the generation prompt must open with {header!r}; it adds "
                             f"{with_prompt[len(without):]!r}")
        return with_prompt[len(without) + len(header):]

    def answer_text(self, ids: list[int]) -> str:
        """An answer's ids as history text (its end-of-turn token is the template's to write)."""
        if ids and ids[-1] in self.target.eos_ids:
            ids = ids[:-1]
        return self.target.tokenizer.decode(ids, skip_special_tokens=False)

    def turn(self, conv: Conversation, index: int, answers: list[list[int]] | None = None) -> TurnPrompt:
        """The prompt of assistant turn `index` of `conv`. Earlier assistant turns are `answers` (the target's
        ids for them) or, when None, the conversation's own text."""
        upto = conv.assistant_turns[index]
        messages, a = [], 0
        for m in conv.messages[:upto]:
            if m["role"] == "assistant" and answers is not None:
                m = {"role": "assistant", "content": [{"type": "text", "text": self.answer_text(answers[a])}]}
                a += 1
            messages.append(m)
        text = self.render(messages, True)
        self.check_chars(text)
        return TurnPrompt(text, images_in(messages, conv))

    def encode(self, prompts: list[TurnPrompt]) -> dict:
        """Processor inputs of `prompts` with left padding (vision targets: images preprocessed)."""
        texts = [p.text for p in prompts]
        if self.target.is_vision:
            images = [img for p in prompts for img in p.images]
            return dict(self.target.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                              return_tensors="pt"))
        return dict(self.target.processor(texts, padding=True, padding_side="left", return_tensors="pt"))

    def check_chars(self, text: str) -> None:
        """Refuse a text that cannot fit max_length tokens before tokenising it: a token spans at most
        MAX_CHARS_PER_TOKEN characters, and tokenising a huge string is what costs the time and memory."""
        limit = self.settings.max_length * MAX_CHARS_PER_TOKEN
        if len(text) > limit:
            raise SkipSample("too_long", f"{len(text)} characters cannot fit max_length "
                             f"{self.settings.max_length} tokens")

    def check_length(self, tokens: int, what: str = "prompt") -> None:
        if tokens > self.settings.max_length:
            raise SkipSample("too_long", f"{what} of {tokens} tokens > max_length {self.settings.max_length}")


def images_in(messages: list[dict], conv: Conversation) -> list:
    """The conversation's images that `messages` (a prefix of it) refer to, in order."""
    n = sum(p["type"] == "image" for m in messages for p in m["content"])
    return conv.images[:n]
