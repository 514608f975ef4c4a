"""Tokenizer loading and incremental detokenization.

Split out of processing.py to keep each file one concept. We use the `tokenizers` library only:
`tokenizer.json` when the folder has one, else Qwen2's `vocab.json` + `merges.txt` (+ the added
tokens listed in `tokenizer_config.json`), which is what Apple's repos ship. A folder without any
tokenizer still loads; encoding then raises `TokenizerError`.

`IncrementalDetokenizer` turns a growing list of ids into text deltas without ever emitting a
broken UTF-8 sequence (byte-level BPE splits multi-byte characters across tokens): it re-decodes a
short window and holds back text that ends in U+FFFD, the same scheme vLLM uses.

`text_tokenizer` is the copy that encodes message text: its added special tokens are not matched
(`encode_special_tokens`, transformers' `split_special_tokens`), so a user who types
`<|im_start|>` gets the characters, never the control token; the chat template inserts the real
control tokens structurally (processing.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TokenizerError

# Qwen2's pre-tokenizer split pattern (tokenizer.json of the Qwen2 repos).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def generation_limits(eos_token_id, tokenizer) -> tuple[list[int], int | None]:
    """(ids that end a generation, vocabulary limit): the config's EOS plus the chat stop
    tokens; ids past the tokenizer's vocabulary are padding rows that must never be sampled."""
    ids = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    ids.discard(None)
    if tokenizer is None:
        return sorted(ids), None
    ids |= {i for t in STOP_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
    return sorted(ids), tokenizer.get_vocab_size(with_added_tokens=True)


def load_tokenizer(folder: Path):
    """Return a `tokenizers.Tokenizer` or None when the folder has no tokenizer files."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    folder = Path(folder)
    try:
        if (folder / "tokenizer.json").exists():
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.exists() and merges.exists()):
            return None
        tok = Tokenizer(BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise TokenizerError(f"cannot read the tokenizer in {folder}: {e}") from e
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added: dict[int, str] = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        for i, entry in json.loads(cfg_path.read_text()).get("added_tokens_decoder", {}).items():
            added[int(i)] = entry["content"]
    if (folder / "added_tokens.json").exists():
        added.update(
            {v: k for k, v in json.loads((folder / "added_tokens.json").read_text()).items()}
        )
    for i in sorted(added):
        tok.add_special_tokens([AddedToken(added[i], special=True, normalized=False)])
        if tok.token_to_id(added[i]) != i:
            raise TokenizerError(
                f"added token {added[i]!r} got id {tok.token_to_id(added[i])}, expected {i}"
            )
    return tok


def text_tokenizer(tokenizer, extra_special: tuple[int, ...] = ()):
    """A copy of `tokenizer` that encodes every added special token (and the added tokens with
    ids in `extra_special`, e.g. the image token) as ordinary text. A copy, not a toggle on the
    shared tokenizer: other threads keep encoding with it."""
    from tokenizers import Tokenizer

    spec = tokenizer.to_str()
    added = tokenizer.get_added_tokens_decoder()
    if any(i in added and not added[i].special for i in extra_special):
        d = json.loads(spec)
        for entry in d.get("added_tokens", []):
            if entry.get("id") in extra_special:
                entry["special"] = True  # only special added tokens are split by the flag below
        spec = json.dumps(d)
    copy = Tokenizer.from_str(spec)
    copy.encode_special_tokens = True
    return copy


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back only complete new text."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (may contain U+FFFD if the bytes were bad)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
