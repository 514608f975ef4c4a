"""Everything between user input and token ids / pixels: chat templates, image-placeholder
expansion and the `Processor` that ties them to the image pipeline (images.py).

Design decisions:
* Chat templates render to items: control tokens and image slots come from the template only,
  message text is encoded as text (added special tokens split, as the OpenAI API does), and
  each image slot becomes `num_image_tokens` copies of `image_token_id`, so the model sees final
  lengths and typed `<|im_start|>` / `<image>` cannot forge a turn or an image. Trusted prompt
  strings (training data) still go through `tokenize`, which splits on `<image>` markers.
* Several images per message and per conversation: each gets its own placeholder run, in order.
  `tokens_per_image` (token reduction, pooled in the model) shortens every run to that count.
  A video part `{"type": "video", "video": path}` becomes its sampled frames, each introduced by
  its timestamp ("Frame 1 (0.0 s): <image>"), so the model sees time order (fastvlm/video.py).
  `max_images` (frames included) bounds one request's vision work with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import FastVLMConfig
from .errors import ImageError, PromptError, TokenizerError
from .images import ImageInput, load_image, preprocess_image
from .model.fastvlm import check_tokens_per_image
from .tokenization import text_tokenizer
from .video import read_frames

IMAGE_MARKER = "<image>"
DEFAULT_MAX_IMAGES = 64  # per request, video frames included


# ---------------------------------------------------------------------- chat templates
def _parts(content: Any) -> list[dict]:
    """Normalise message content (str or OpenAI-style list) into [{"type": "text"|"image", ...}]."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(
            f"message content must be a string or a list of parts, got {type(content).__name__}"
        )
    out = []
    for p in content:
        if isinstance(p, str):
            out.append({"type": "text", "text": p})
            continue
        if not isinstance(p, dict) or "type" not in p:
            raise ValueError(f"content part must be a dict with a 'type', got {p!r:.80}")
        t = p["type"]
        if t in ("text", "input_text"):
            out.append({"type": "text", "text": str(p.get("text", ""))})
        elif t in ("image", "image_url", "input_image"):
            src = p.get("image", p.get("image_url", p.get("url")))
            if isinstance(src, dict):
                src = src.get("url")
            out.append({"type": "image", "image": src})
        elif t in ("video", "video_url", "input_video"):
            out.append(_video_part(p))
        else:
            raise ValueError(f"unsupported content part type {t!r}")
    return out


def _video_part(p: dict) -> dict:
    """A video part → its frames and timestamps; rendering gives each frame a timestamped
    image slot ("Frame 1 (0.0 s): <image>").

    `{"type": "video", "video": path, "fps": 1, "max_frames": 16}` is decoded here (video.py);
    `{"type": "video", "frames": [images], "timestamps": [s, ...]}` is already decoded."""
    if p.get("frames") is not None:
        images = list(p["frames"])
        times = p.get("timestamps") or [None] * len(images)
        if len(times) != len(images):
            raise ValueError("a video part needs one timestamp per frame")
    else:
        src = p.get("video", p.get("video_url", p.get("url")))
        if isinstance(src, dict):
            src = src.get("url")
        frames = read_frames(src, fps=p.get("fps"), max_frames=p.get("max_frames") or 16)
        images, times = [f.image for f in frames], [f.time for f in frames]
    return {"type": "video", "frames": images, "timestamps": list(times)}


# A rendered prompt is a list of items (kind, text, is_assistant_output). Only the template
# emits "special" items (control tokens) and "image" slots; message text is always a "text" item,
# so text that spells `<|im_start|>` or `<image>` cannot forge a turn or an image.
Item = tuple[str, str, bool]


def _part_items(part: dict) -> list[tuple[str, str]]:
    if part["type"] == "text":
        return [("text", part["text"])]
    out: list[tuple[str, str]] = []
    for i, t in enumerate(part["timestamps"], 1):
        stamp = "" if t is None else f" ({t:.1f} s)"
        out += [("text", f"{'' if i == 1 else chr(10)}Frame {i}{stamp}: "), ("image", IMAGE_MARKER)]
    return out


def render_turns(
    messages: list[dict],
    style: str = "apple",
    system_prompt: str | None = "You are a helpful assistant.",
    add_generation_prompt: bool = True,
) -> tuple[list[list[Item]], list[Any]]:
    """Messages → (one item list per turn, image sources in slot order).

    "apple" = Apple's conv_qwen_2: images as "<image>\n" before the text of their message.
    "hf"    = transformers' FastVLM template: images first, each text part prefixed by "\n".
    """
    if not messages:
        raise ValueError("messages is empty")
    images: list[Any] = []
    turns: list[list[Item]] = []

    def turn(role: str, body: list[tuple[str, str]], trained: bool = False) -> list[Item]:
        return [
            ("special", "<|im_start|>", False),
            ("text", f"{role}\n", False),
            *((k, t, trained) for k, t in body),
            ("special", "<|im_end|>", trained),
            ("text", "\n", False),
        ]

    if messages[0].get("role") != "system" and system_prompt is not None:
        turns.append(turn("system", [("text", system_prompt)]))
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role must be system, user or assistant, got {role!r}")
        parts = _parts(m.get("content"))
        imgs = [p["image"] for p in parts if p["type"] == "image"]
        frames = [f for p in parts if p["type"] == "video" for f in p["frames"]]
        if (imgs or frames) and role != "user":
            raise ValueError("images are only allowed in user messages")
        images.extend(imgs + frames)  # image slots come first in both styles
        texts = [_part_items(p) for p in parts if p["type"] != "image"]
        body: list[tuple[str, str]] = []
        if style == "hf":
            body += [("image", IMAGE_MARKER)] * len(imgs)
            for t in texts:
                body += [("text", "\n"), *t]
        else:
            for _ in imgs:
                body += [("image", IMAGE_MARKER), ("text", "\n")]
            for j, t in enumerate(texts):
                body += ([("text", "\n")] if j else []) + t
        turns.append(turn(role, body, trained=role == "assistant"))
    if add_generation_prompt:
        turns.append([("special", "<|im_start|>", False), ("text", "assistant\n", False)])
    return turns, images


def render_segments(
    messages: list[dict],
    style: str = "apple",
    system_prompt: str | None = "You are a helpful assistant.",
    add_generation_prompt: bool = True,
) -> tuple[list[tuple[str, bool]], list[Any]]:
    """Messages → ([(text, is_assistant_output)], image sources in marker order).

    Concatenating the texts gives the prompt (with `<image>` markers). The flag marks the
    assistant replies and their `<|im_end|>`: the tokens a fine-tune computes loss on."""
    turns, images = render_turns(messages, style, system_prompt, add_generation_prompt)
    segs: list[tuple[str, bool]] = []
    for items in turns:  # one segment per run of equal flags inside a turn
        start = len(segs)
        for _, text, flag in items:
            if len(segs) > start and segs[-1][1] == flag:
                segs[-1] = (segs[-1][0] + text, flag)
            else:
                segs.append((text, flag))
    return segs, images


def render_chat(
    messages: list[dict],
    style: str = "apple",
    system_prompt: str | None = "You are a helpful assistant.",
    add_generation_prompt: bool = True,
) -> tuple[str, list[Any]]:
    """Messages → (prompt string with `<image>` markers, image sources in marker order).
    For display and trusted prompts; `Processor` tokenizes the structured turns instead."""
    segs, images = render_segments(messages, style, system_prompt, add_generation_prompt)
    return "".join(t for t, _ in segs), images


class Processor:
    """Prompt + images → (input_ids, pixel_values) for one FastVLM config and tokenizer."""

    def __init__(
        self, config: FastVLMConfig, tokenizer=None, max_images: int | None = DEFAULT_MAX_IMAGES
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_images = max_images  # None = no limit
        self._text_tok = None  # built on first use: a tokenizer copy that splits special tokens

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def encode_text(self, text: str) -> list[int]:
        """Trusted text: added special tokens in it are matched (template, train data)."""
        if self.tokenizer is None:
            raise TokenizerError(
                "this model folder has no tokenizer (tokenizer.json or vocab.json + merges.txt); "
                "copy the tokenizer files of its base model into it to use text prompts"
            )
        _check_unicode(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_message_text(self, text: str, allow_special_tokens: bool = False) -> list[int]:
        """Message text, tokenized as text: `<|im_start|>`, `<image>` (every added special token)
        become their characters' ordinary BPE pieces, as the OpenAI API does. With
        `allow_special_tokens` (trusted callers) control tokens in the text are kept."""
        if allow_special_tokens or self.tokenizer is None:
            ids = self.encode_text(text)
            if self.config.image_token_id in ids:  # a slot without an image breaks the merge
                raise PromptError(
                    "message text contains the image token; send images as image parts"
                )
            return ids
        _check_unicode(text)
        if self._text_tok is None:
            self._text_tok = text_tokenizer(self.tokenizer, (self.config.image_token_id,))
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def tokenize(
        self, prompt: str, n_images: int | None = None, tokens_per_image: int | None = None
    ) -> list[int]:
        """Trusted prompt string: split on `<image>` markers and expand each into the image
        placeholder run (`tokens_per_image` long when given, else the model's native count)."""
        chunks = prompt.split(IMAGE_MARKER)
        if n_images is not None and len(chunks) - 1 != n_images:
            raise ValueError(
                f"the prompt has {len(chunks) - 1} <image> markers but {n_images} images were given"
            )
        ids: list[int] = []
        n = check_tokens_per_image(tokens_per_image, self.num_image_tokens)
        run = [self.config.image_token_id] * n
        for i, chunk in enumerate(chunks):
            if i:
                ids.extend(run)
            if chunk:
                ids.extend(self.encode_text(chunk))
        return ids

    def encode_turns(
        self,
        turns: list[list[Item]],
        tokens_per_image: int | None = None,
        allow_special_tokens: bool = False,
    ) -> list[int]:
        """Rendered turns → ids: control tokens by the template, one placeholder run per image
        slot, and the text between them encoded as text."""
        run = [self.config.image_token_id] * check_tokens_per_image(
            tokens_per_image, self.num_image_tokens
        )
        ids: list[int] = []
        text: list[str] = []  # adjacent text items are encoded as one string, as before
        for kind, piece, _ in (item for items in turns for item in items):
            if kind == "text":
                text.append(piece)
                continue
            if text and (joined := "".join(text)):
                ids.extend(self.encode_message_text(joined, allow_special_tokens))
            text.clear()
            ids.extend(run if kind == "image" else self.encode_text(piece))
        if text and (joined := "".join(text)):
            ids.extend(self.encode_message_text(joined, allow_special_tokens))
        return ids

    def encode_messages(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        tokens_per_image: int | None = None,
        allow_special_tokens: bool = False,
    ) -> tuple[list[int], list[Any]]:
        """Messages → (input ids, image sources); no pixels are decoded."""
        c = self.config
        turns, images = render_turns(
            messages, c.chat_template, c.system_prompt, add_generation_prompt
        )
        return self.encode_turns(turns, tokens_per_image, allow_special_tokens), images

    def pixels(self, images: Sequence[ImageInput]) -> torch.Tensor | None:
        if not images:
            return None
        c = self.config
        return torch.stack(
            [
                preprocess_image(
                    load_image(im),
                    c.vision.image_size,
                    c.image_aspect_ratio,
                    c.image_mean,
                    c.image_std,
                )
                for im in images
            ]
        )

    def __call__(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        tokens_per_image: int | None = None,
        max_images: int | None = None,
        allow_special_tokens: bool = False,
    ) -> tuple[list[int], torch.Tensor | None, str]:
        n = check_tokens_per_image(tokens_per_image, self.num_image_tokens)  # fail before decoding
        c = self.config
        turns, images = render_turns(
            messages, c.chat_template, c.system_prompt, add_generation_prompt
        )
        limit = self.max_images if max_images is None else max_images
        if limit is not None and len(images) > limit:
            raise ImageError(
                f"this request has {len(images)} images (video frames included) but the limit is "
                f"{limit}: send fewer images, lower a video's max_frames, or raise max_images"
            )
        pixel_values = self.pixels(images)  # images first: a bad image fails before tokenizing
        ids = self.encode_turns(turns, n, allow_special_tokens)
        prompt = "".join(text for items in turns for _, text, _ in items)
        return ids, pixel_values, prompt


def _check_unicode(text: str) -> None:
    """The tokenizer takes UTF-8 only: a lone surrogate ("\ud800") is a user error, not a crash."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(
                f"message text is not valid Unicode: {text[e.start : e.end]!a} at character "
                f"{e.start} (a lone UTF-16 surrogate)"
            ) from e
