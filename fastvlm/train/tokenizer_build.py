"""Build the small byte-level BPE tokenizer of the tiny shapes FastVLM.

The tokenizer follows Qwen2's design at a tiny scale: a ``ByteLevel`` pre-tokenizer (GPT-2
regex split, no prefix space) and decoder, a BPE model whose initial alphabet is all 256 byte
symbols (so *any* text, including unicode and emoji, encodes and decodes back exactly), and the
special tokens at fixed ids::

    0 <|endoftext|>   1 <|im_start|>   2 <|im_end|>   3 <image>

Special tokens are registered as added tokens, so each one always encodes to a single id even
inside running text. The training corpus is the chat-formatted shapes conversations (Qwen2's
ChatML template with the default system prompt) plus the fixed vocabulary of the dataset.

``python -m fastvlm.train.tokenizer_build DATASET_DIR [--vocab-size 512] [--out FILE]`` reads
``DATASET_DIR/train.jsonl`` and writes ``DATASET_DIR/tokenizer.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fastvlm.train import shapes

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))
SYSTEM_PROMPT = "You are a helpful assistant."
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def chat_text(
    conversations: Sequence[dict[str, str]], system: str = SYSTEM_PROMPT, eos: bool = False
) -> str:
    """Render LLaVA-style turns (``{"from": "human"|"gpt", "value"}``) in Qwen2's ChatML."""
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for turn in conversations:
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}[
            turn["from"]
        ]
        parts.append(f"<|im_start|>{role}\n{turn['value']}<|im_end|>\n")
    if eos:
        parts.append("<|endoftext|>")
    return "".join(parts)


def base_corpus() -> list[str]:
    """Texts always included: chat scaffolding and the dataset's whole fixed vocabulary."""
    words = [
        *shapes.KINDS,
        *shapes.PLURALS.values(),
        *shapes.COLORS,
        *shapes.SIZES,
        *shapes.NUMBER_WORDS,
        *[str(i) for i in range(10)],
        "left right above below top bottom middle shape shapes one",
    ]
    texts = [" ".join(words), " ".join(w.capitalize() for w in words)]
    for prompt in shapes.DESCRIBE_PROMPTS:
        texts.append(
            chat_text(
                [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": ""}],
                eos=True,
            )
        )
    texts.append(f"<|im_start|>user\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    return texts


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (plus :func:`base_corpus`) with fixed special ids."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )

    def corpus() -> Iterator[str]:
        yield from base_corpus()
        yield from texts

    tok.train_from_iterator(corpus(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # pragma: no cover - guaranteed by BpeTrainer's ordering
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def dataset_texts(dataset_dir: str | Path) -> Iterator[str]:
    """Chat-formatted conversations of ``dataset_dir/train.jsonl``."""
    with open(Path(dataset_dir) / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield chat_text(json.loads(line)["conversations"], eos=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastvlm.train.tokenizer_build",
        description="Train the byte-level BPE tokenizer on a shapes dataset folder.",
    )
    p.add_argument("dataset", help="folder written by `python -m fastvlm.train.shapes`")
    p.add_argument("--vocab-size", type=int, default=512, help="target vocab size (default 512)")
    p.add_argument("--out", default=None, help="output file (default DATASET/tokenizer.json)")
    args = p.parse_args(argv)
    tok = build_tokenizer(dataset_texts(args.dataset), args.vocab_size)
    out = Path(args.out) if args.out else Path(args.dataset) / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    print(f"wrote {out} (vocab size {tok.get_vocab_size()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
