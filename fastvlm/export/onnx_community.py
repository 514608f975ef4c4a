"""The onnx-community contract: file names and side files transformers.js reads as is.

transformers.js (`@huggingface/transformers`: `AutoModelForImageTextToText` resolves
`LlavaQwen2ForCausalLM`) loads an exported folder when it finds:

* `config.json`: `model_type: "llava_qwen2"` with flat Qwen2 keys (Apple's format, which
  `config_to_format(cfg, "apple")` writes) + `transformers.js_config` = per-file `dtype` (it picks
  `onnx/{name}{suffix}.onnx` by dtype) and `use_external_data_format` where `.onnx_data` exists;
* `onnx/vision_encoder*.onnx` with output `image_features`, `onnx/embed_tokens*.onnx`,
  `onnx/decoder_model_merged*.onnx` whose past-KV axis 0 is named `batch_size` (it fills that
  symbol when it allocates the empty cache);
* `tokenizer.json` + `tokenizer_config.json` (tokenizer class, special tokens, chat template),
  `preprocessor_config.json` (pixels), `processor_config.json` (`image_token`, `patch_size`: it
  expands one `<image>` to (S / patch)² placeholders), `generation_config.json` (EOS ids).

Preprocessing: transformers.js has no pad-to-square-before-resize, so the exported processor is
the transformers one (shortest edge → S, centre crop): equal to Apple's framing for square
images; the web page and js/generate.mjs pad non-square images to a square first (README).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import FastVLMConfig
from ..tokenization import STOP_TOKENS
from ..weights import config_to_format, preprocessor_config

# our precision → (transformers.js dtype, file-name suffix it looks for)
JS_DTYPE = {"fp32": ("fp32", ""), "fp16": ("fp16", "_fp16"), "int8": ("q8", "_quantized"),
            "int4": ("q4", "_q4")}  # fmt: skip
# component → (graph base name, the precision key that decides its dtype)
GRAPHS = {
    "vision": ("vision_encoder", "vision"),
    "embed": ("embed_tokens", "embed"),
    "decoder": ("decoder_model_merged", "llm"),
    "projector": ("mm_projector", "projector"),  # ours (token reduction); transformers.js skips it
}
IMAGE_TOKEN = "<image>"
# Second output of the vision graph (pre-projector features) and the projector graph's input.
VISION_FEATURES = "vision_features"


def file_names(precision: dict[str, str]) -> dict[str, str]:
    """Relative path of each graph for `precision`, suffixed as transformers.js expects."""
    out = {}
    for key, (base, part) in GRAPHS.items():
        # vision graph = tower + projector; mixed precision is named after the tower (the bulk)
        out[key] = f"onnx/{base}{JS_DTYPE[precision[part]][1]}.onnx"
    return out


def js_config(precision: dict[str, str], onnx_dir: Path) -> dict:
    """`transformers.js_config`: dtype per loaded graph, external data where it was written."""
    dtype, external = {}, {}
    names = file_names(precision)
    for key in ("vision", "embed", "decoder"):
        base, part = GRAPHS[key]
        dtype[base] = JS_DTYPE[precision[part]][0]
        name = Path(names[key]).name
        if (onnx_dir / f"{name}_data").exists():
            external[name] = 1
    out: dict = {"dtype": dtype}
    if external:
        out["use_external_data_format"] = external
    return out


def chat_template(cfg: FastVLMConfig) -> str:
    """Jinja equivalent of processing.render_chat for the model's style (apple or hf). Every
    newline is a `{{ '\\n' }}` expression: chat renderers trim newlines next to block tags."""
    nl = "{{ '\\n' }}"
    system = json.dumps(cfg.system_prompt)  # a Jinja string literal
    if cfg.chat_template == "hf":  # images first, each text part prefixed by a newline
        text = nl + "{{ m.content }}"
        body = (
            "{% for p in m.content %}{% if p.type == 'image' %}<image>{% endif %}{% endfor %}"
            "{% for p in m.content %}{% if p.type == 'text' %}" + nl + "{{ p.text }}"
            "{% endif %}{% endfor %}"
        )
    else:  # Apple conv_qwen_2: "<image>\n" per image, then the text parts joined by newlines
        text = "{{ m.content }}"
        body = (
            "{% for p in m.content %}{% if p.type == 'image' %}<image>" + nl + "{% endif %}"
            "{% endfor %}{% set ns = namespace(first=true) %}"
            "{% for p in m.content %}{% if p.type == 'text' %}{% if not ns.first %}" + nl +
            "{% endif %}{{ p.text }}{% set ns.first = false %}{% endif %}{% endfor %}"
        )  # fmt: skip
    return (
        "{% for m in messages %}"
        "{% if loop.first and m.role != 'system' %}<|im_start|>system" + nl + "{{ " + system +
        " }}<|im_end|>" + nl + "{% endif %}"
        "<|im_start|>{{ m.role }}" + nl +
        "{% if m.content is string %}" + text + "{% else %}" + body + "{% endif %}"
        "<|im_end|>" + nl + "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant" + nl + "{% endif %}"
    )  # fmt: skip


def eos_ids(cfg: FastVLMConfig, tokenizer) -> list[int]:
    eos = cfg.text.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None:
        ids |= {i for t in STOP_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
    return sorted(ids)


def patch_size(cfg: FastVLMConfig) -> int:
    """Pixels per image token side: transformers.js computes (S / patch)² placeholders."""
    side = math.isqrt(cfg.num_image_tokens)
    return cfg.vision.image_size // side


def write_side_files(cfg: FastVLMConfig, tokenizer, out: Path, precision: dict[str, str]) -> None:
    """config.json, tokenizer*.json, (pre)processor and generation configs of the contract."""
    config = config_to_format(cfg, "apple")
    config["transformers.js_config"] = js_config(precision, out / "onnx")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = eos_ids(cfg, tokenizer)
    gen = {"eos_token_id": eos, "do_sample": False, "max_new_tokens": 256}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    pre = preprocessor_config(cfg)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    proc = {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": patch_size(cfg),
        "num_additional_image_tokens": 0,
        "vision_feature_select_strategy": "full",
    }
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    if tokenizer is None:
        return
    tokenizer.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": tokenizer.id_to_token(i), "special": True, "lstrip": False,
                 "rstrip": False, "normalized": False, "single_word": False}
        for i in sorted(tokenizer.get_added_tokens_decoder())
    }  # fmt: skip
    end = tokenizer.id_to_token(eos[0]) if eos else None
    tok_cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>" if tokenizer.token_to_id("<|im_end|>") is not None else end,
        "pad_token": "<|endoftext|>" if tokenizer.token_to_id("<|endoftext|>") is not None else end,
        "unk_token": None,
        "image_token": IMAGE_TOKEN,
        "model_max_length": cfg.text.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(cfg),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


FOLDER_README = """# {name} — ONNX export (fastvlm)

Exported by `fastvlm export onnx` (fastvlm {version}); precision: `{precision}`. The folder
follows the onnx-community layout: transformers.js loads it as is
(`AutoModelForImageTextToText.from_pretrained`, dtype per graph from `config.json`).

| file | inputs | outputs |
|---|---|---|
| {vision} | pixel_values float32 (N, 3, {s}, {s}) | \
image_features float32 (N, {tok}, {d}), vision_features (N, {tok}, {c}) |
| {embed} | input_ids int64 (B, T) | inputs_embeds float32 (B, T, {d}) |
| {decoder} | inputs_embeds (B, T, {d}), attention_mask int64 (B, P+T), \
position_ids int64 (B, T), past_key_values.{{0..{last}}}.key/value float32 (B, {kv}, P, {hd}) | \
logits float32 (B, T, {v}), present.{{0..{last}}}.key/value (B, {kv}, P+T, {hd}) |
| {projector} | vision_features float32 (N, K, {c}) | image_features (N, K, {d}) |

Prompt ids contain {tok} copies of the image token id {image_id} per image; replace those rows of
`inputs_embeds` with `image_features` before the first decoder call (past length P = 0, shape
(B, {kv}, 0, {hd})). Token reduction to K tokens: average-pool `vision_features` (a
{side}×{side} row-major grid) to √K×√K, then run the projector graph. Pixels: pad to square
(black), resize to {s}×{s}, RGB, scaled to [0, 1], mean {mean}, std {std}
(`preprocessor_config.json` centre-crops instead: identical for square images).

Run it with fastvlm (ONNX Runtime backend, same API as the PyTorch model):

```python
import fastvlm
vlm = fastvlm.load("{out}")          # detects the export → ONNX Runtime
print(vlm.describe("image.png"))
```

Parity against PyTorch at export time:

```
{parity}
```
"""
