"""`fastvlm export litertlm MODEL OUT`: one `.litertlm` bundle for Google's LiteRT-LM runtime
(Android / iOS / desktop), the same container Google ships FastVLM-0.5B in.

OUT/model.litertlm holds: the LLM metadata proto (FastVLM model type, stop tokens, chat template
as Jinja with `<image_soft_token>`), the HF tokenizer, and three TFLite graphs built with
litert-torch (litertlm_model.py): the Qwen2 decoder with its KV cache (`prefill_<T>` / `decode`,
embeddings in), the token embedder, and the vision encoder + projector (NHWC image in).
Weights: `llm` fp32 / int8 / int4 (dynamic-range, litert-torch's generative recipes), `vision`
fp32 / fp16 / int8 and `embed` fp32 / fp16 / int8 / int4 (weight-only, ai-edge-quantizer).

Every export is checked (litertlm_run.py) unless --no-parity: greedy tokens of the graphs run in
ai-edge-litert's interpreter, and (when `litert-lm-api` is importable) the bundle's greedy reply
through the LiteRT-LM Python API, against PyTorch's for an image prompt and a text prompt. The
share of the reference reproduced before the first difference must reach --min-match (1.0 for
fp32, 0.5 with quantized weights); exit 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from . import litert_env
from .precision import as_precision, describe, resolve_precision

ALLOWED = {
    "vision": ("fp32", "fp16", "int8"),
    "projector": ("fp32", "fp16", "int8"),  # one graph with vision: follows it
    "embed": ("fp32", "fp16", "int8", "int4"),
    "llm": ("fp32", "int8", "int4"),
}
IMAGE_SOFT_TOKEN = "<image_soft_token>"
PARITY_PROMPT = "Describe this image."
TEXT_PROMPT = "How many shapes are there?"


def chat_template(system_prompt: str | None) -> str:
    """Apple's conv_qwen_2 as Jinja (processing.render_segments, style "apple"): images as
    `<image_soft_token>\\n` before the message text, texts joined by newlines."""
    sys_part = (
        ""
        if system_prompt is None
        else "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n"
        + system_prompt.replace("{", "{{ '{' }}")
        + "<|im_end|>\n{% endif %}"
    )
    return (
        sys_part + "{% for m in messages %}<|im_start|>"
        "{{ 'assistant' if m['role'] == 'model' else m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        + IMAGE_SOFT_TOKEN
        + "\n{% endif %}{% endfor %}"
        "{% for c in m['content'] if c['type'] == 'text' %}"
        "{% if not loop.first %}\n{% endif %}{{ c['text'] }}{% endfor %}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    eos = model.config.text.eos_token_id
    for e in eos if isinstance(eos, list) else [eos]:
        if e is not None:
            ids.add(int(e))
    for name in ("<|im_end|>", "<|endoftext|>"):
        t = tokenizer.token_to_id(name) if tokenizer is not None else None
        if t is not None:
            ids.add(int(t))
    return sorted(ids)


def write_metadata(path: Path, model, tokenizer, max_len: int) -> None:
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    md = llm_metadata_pb2.LlmMetadata()
    for t in stop_token_ids(model, tokenizer):
        md.stop_tokens.add().token_ids.ids.append(t)
    md.max_num_tokens = max_len
    s = model.config.vision.image_size
    md.llm_model_type.CopyFrom(
        llm_model_type_pb2.LlmModelType(
            fast_vlm=llm_model_type_pb2.FastVlm(image_tensor_height=s, image_tensor_width=s)
        )
    )
    md.jinja_prompt_template = chat_template(model.config.system_prompt)
    path.write_bytes(md.SerializeToString())


def bundle(out: Path, parts: dict[str, Path], metadata: Path, tokenizer_json: Path) -> Path:
    """Write OUT/model.litertlm from the converted graphs (section types LiteRT-LM expects)."""
    import litert_lm_builder as lb

    b = lb.LitertLmFileBuilder()
    b.add_system_metadata(lb.Metadata(key="Authors", value="fastvlm export", dtype=lb.DType.STRING))
    b.add_llm_metadata(str(metadata))
    b.add_hf_tokenizer(str(tokenizer_json))
    kinds = {
        "decoder": lb.TfLiteModelType.PREFILL_DECODE,
        "embedder": lb.TfLiteModelType.EMBEDDER,
        "vision": lb.TfLiteModelType.VISION_ENCODER,
    }
    for name, path in parts.items():
        b.add_tflite_model(str(path), kinds[name])
    dest = out / "model.litertlm"
    with open(dest, "wb") as f:
        b.build(f)
    return dest


VISION_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
EMBED_OPS = ("EMBEDDING_LOOKUP",)
BITS = {"fp16": 16, "int8": 8, "int4": 4}


def quantize_weights(path: Path, precision: str, ops: tuple[str, ...]) -> None:
    """Weight-only fp16 / int8 / int4 of `ops` in a converted graph, in place
    (ai-edge-quantizer; activations stay fp32, so no calibration data is needed)."""
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(str(path))
    fp16 = precision == "fp16"
    algo = AlgorithmName.FLOAT_CASTING if fp16 else AlgorithmName.MIN_MAX_UNIFORM_QUANT
    for op in ops:
        try:
            q.add_weight_only_config(".*", op, BITS[precision], algorithm_key=algo)
        except ValueError:  # an op this algorithm cannot take stays float
            pass
    path.write_bytes(bytes(q.quantize().quantized_model))


def parity_image(model, src: Path | None, dest: Path) -> Path:
    """An S×S PNG: LiteRT-LM stretches images to S×S while we pad to square first, so the
    check feeds both runtimes a picture that is already square and S wide."""
    from ..images import expand2square, to_rgb

    s = model.config.vision.image_size
    if src is not None and src.exists():
        img = to_rgb(Image.open(src))
        img = expand2square(img, tuple(int(m * 255) for m in model.config.image_mean))
        img = img.resize((s, s), Image.BICUBIC)
    else:  # a fixed gradient when the package ships no example image
        y, x = np.mgrid[0:s, 0:s]
        img = Image.fromarray(
            np.stack([x * 255 // s, y * 255 // s, (x + y) * 127 // s], -1).astype(np.uint8)
        )
    img.save(dest)
    return dest


def prefix_match(ref, got) -> float:
    """Share of the reference sequence reproduced before the first difference (1.0 = equal)."""
    if list(ref) == list(got):
        return 1.0
    n = min(len(ref), len(got))
    n = next((i for i in range(n) if ref[i] != got[i]), n)
    return n / max(len(ref), 1)


@dataclass
class LiteRTLMParity:
    min_match: float = 1.0
    rows: list[tuple[str, object, object, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, ref, got, ref_ids=None, got_ids=None) -> None:
        score = prefix_match(
            ref if ref_ids is None else ref_ids, got if got_ids is None else got_ids
        )
        self.rows.append((name, ref, got, score))

    @property
    def passed(self) -> bool:
        return all(score >= self.min_match for *_, score in self.rows)

    def to_dict(self) -> dict:
        checks = [{"check": n, "pytorch": a, "litert": b, "prefix_match": round(m, 4)}
                  for n, a, b, m in self.rows]  # fmt: skip
        return {"passed": self.passed, "min_match": self.min_match, "checks": checks,
                "notes": self.notes}  # fmt: skip

    def __str__(self) -> str:
        lines = [
            f"{'PASS' if m >= self.min_match else 'FAIL'} {n} (prefix match {m:.2f}, "
            f"need {self.min_match:.2f}): pytorch={a!r} litert={b!r}"
            for n, a, b, m in self.rows
        ]
        return "\n".join(lines + [f"note: {x}" for x in self.notes])


def check_parity(
    model,
    tokenizer,
    tmp: Path,
    parts: dict[str, Path],
    bundle_path: Path | None,
    max_len: int,
    max_new: int,
    image_src: Path | None,
    min_match: float = 1.0,
) -> LiteRTLMParity:
    """Greedy tokens of the graphs (interpreter) and of the bundle (LiteRT-LM) against PyTorch,
    for one image prompt and one text-only prompt."""
    from ..processing import Processor, render_chat
    from .litertlm_run import InterpreterVLM, litertlm_greedy, torch_greedy

    res = LiteRTLMParity(min_match)
    proc = Processor(model.config, tokenizer)
    eos = set(stop_token_ids(model, tokenizer))
    img_path = parity_image(model, image_src, tmp / "parity.png")
    px = proc.pixels([str(img_path)])
    # the [0, 1] NHWC picture LiteRT-LM's image preprocessor produces
    c = model.config
    nhwc = px.permute(0, 2, 3, 1).numpy() * np.asarray(c.image_std) + np.asarray(c.image_mean)
    run = InterpreterVLM(parts["decoder"], parts["embedder"], parts.get("vision"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(img_path)},
                                         {"type": "text", "text": PARITY_PROMPT}]}]  # fmt: skip
    prompt, _ = render_chat(msgs, "apple", c.system_prompt)
    ids = proc.tokenize(prompt, 1)
    ref = torch_greedy(model, ids, px, max_new, eos)
    res.add("interpreter greedy ids (image prompt)", ref,
            run.greedy(ids, c.image_token_id, nhwc, max_new, eos))  # fmt: skip
    text_ids = proc.tokenize(f"<|im_start|>user\n{TEXT_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    ref_t = torch_greedy(model, text_ids, None, max_new, eos)
    res.add("interpreter greedy ids (text prompt)", ref_t,
            run.greedy(text_ids, c.image_token_id, None, max_new, eos))  # fmt: skip
    if bundle_path is None:
        return res
    if not litert_env.have_runtime():
        res.notes.append("litert-lm-api not importable: bundle not run (pip install litert-lm-api)")
        return res

    def text(out: list[int]) -> str:
        return tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)

    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False).ids

    for name, prompt_text, image, ref_ids in (
        ("LiteRT-LM greedy text (image prompt)", PARITY_PROMPT, img_path, ref),
        ("LiteRT-LM greedy text (text prompt)",
         tokenizer.decode(text_ids, skip_special_tokens=False), None, ref_t),
    ):  # fmt: skip
        got = litertlm_greedy(bundle_path, prompt_text, image, max_new, max_len)
        want = text(ref_ids)
        res.add(name, want, got, enc(want), enc(got))
    return res


def parse_lens(spec: str, max_len: int) -> list[int]:
    try:
        lens = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--prefill must be comma-separated integers, got {spec!r}") from None
    if not lens or lens[0] < 1 or lens[-1] >= max_len:
        raise ConfigError(
            f"--prefill lengths must be in 1..{max_len - 1} (--max-len), got {spec!r}"
        )
    return lens


def convert_parts(model, dest: Path, prec: dict[str, str], max_len: int, prefill_lens) -> dict:
    """The three graphs as DEST/{decoder,embedder,vision_encoder}.tflite, weights quantized."""
    litert_env.require_converter()
    from .litertlm_model import convert_decoder, convert_embedder, convert_vision, reauthor_decoder

    dest.mkdir(parents=True, exist_ok=True)
    parts = {"decoder": dest / "decoder.tflite", "embedder": dest / "embedder.tflite",
             "vision": dest / "vision_encoder.tflite"}  # fmt: skip
    decoder = reauthor_decoder(model, max_len)
    convert_decoder(decoder, max_len, list(prefill_lens), prec["llm"], parts["decoder"])
    convert_embedder(model, list(prefill_lens), parts["embedder"])
    convert_vision(model, parts["vision"])
    if prec["vision"] != "fp32":
        quantize_weights(parts["vision"], prec["vision"], VISION_OPS)
    if prec["embed"] != "fp32":
        quantize_weights(parts["embedder"], prec["embed"], EMBED_OPS)
    return parts


def default_min_match(prec: dict[str, str]) -> float:
    """fp32 graphs must reproduce PyTorch's greedy tokens exactly; quantized weights may flip a
    near-tie late in the answer, so they must match the first half."""
    return 1.0 if all(v == "fp32" for v in prec.values()) else 0.5


def export_litertlm(model, out, precision=None, tokenizer=None, tokenizer_json: Path | None = None,
                    *, max_len: int = 1024, prefill_lens=(128,), parity: bool = True,
                    parity_tokens: int = 16, min_match: float | None = None,
                    image_src: Path | None = None, keep_tflite: bool = False,
                    log=print):  # fmt: skip
    """Convert, bundle and check; returns (file sizes, parity or None)."""
    litert_env.require_converter()
    prec = as_precision(precision, ALLOWED, "LiteRT-LM")
    prec["projector"] = prec["vision"]
    if tokenizer_json is None or not Path(tokenizer_json).exists():
        raise ConfigError(
            "LiteRT-LM bundles need the model's tokenizer.json (HF tokenizers format)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    t0 = time.perf_counter()
    log(
        f"exporting LiteRT-LM bundle ({describe(prec)}, context {max_len}, "
        f"prefill {list(prefill_lens)}) to {out}"
    )
    with tempfile.TemporaryDirectory(prefix="fastvlm-litertlm-") as td:
        tmp = Path(td)
        parts = convert_parts(model, out / "tflite" if keep_tflite else tmp, prec, max_len,
                              prefill_lens)  # fmt: skip
        write_metadata(tmp / "llm_metadata.pb", model, tokenizer, max_len)
        dest = bundle(out, parts, tmp / "llm_metadata.pb", Path(tokenizer_json))
        files = {p.name: p.stat().st_size for p in parts.values()}
        result = None
        if parity:
            floor = default_min_match(prec) if min_match is None else min_match
            result = check_parity(
                model, tokenizer, tmp, parts, dest, max_len, parity_tokens, image_src, floor
            )
    inside = "" if keep_tflite else " inside"
    files = {dest.name: dest.stat().st_size, **{f"({k}{inside})": v for k, v in files.items()}}
    manifest = {"format": "litertlm", "files": {"bundle": dest.name}, "precision": prec,
                "max_len": max_len, "prefill": list(prefill_lens),
                "seconds": round(time.perf_counter() - t0, 1),
                "parity": None if result is None else result.to_dict()}  # fmt: skip
    (out / "fastvlm_export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(
        "# FastVLM — LiteRT-LM bundle (fastvlm)\n\n"
        f"`model.litertlm`: decoder ({prec['llm']}, KV cache {max_len}), embedder, vision encoder "
        f"({prec['vision']}), tokenizer, chat template.\n\n```python\nimport litert_lm\n"
        'eng = litert_lm.Engine("model.litertlm", backend=litert_lm.Backend.CPU())\n'
        "conv = eng.create_conversation()\n"
        "conv.send_message(litert_lm.Message.user(litert_lm.Contents.of(\n"
        '    litert_lm.Content.ImageFile("photo.jpg"), "Describe this image.")))\n```\n\n'
        f"Parity against PyTorch:\n\n```\n{result or '(skipped)'}\n```\n"
    )
    return files, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastvlm export litertlm", description=__doc__.split("\n")[0])
    p.add_argument("model", help="model folder, Hugging Face repo id, or 'tiny' (embedded demo)")
    p.add_argument("out", help="output folder (created; must be empty or absent unless --force)")
    p.add_argument("--preset", choices=["quality", "balanced", "small"], default=None,
                   help="quality: fp32; balanced: fp16 vision + int8 LLM; "
                   "small: fp16 vision + int4 LLM")  # fmt: skip
    p.add_argument("--precision", default=None, help="per component, e.g. vision=fp16,llm=int8")
    p.add_argument("--image-size", type=int, default=None, help="encoder resolution override")
    p.add_argument("--max-len", type=int, default=1024, help="KV-cache length (context) in tokens")
    p.add_argument("--prefill", default="128", help="prefill signature lengths, e.g. 32,128")
    p.add_argument("--parity-tokens", type=int, default=16, help="greedy tokens compared")
    p.add_argument("--min-match", type=float, default=None,
                   help="greedy prefix share that must match PyTorch (default 1.0 for fp32, "
                   "0.5 with quantized weights)")  # fmt: skip
    p.add_argument("--no-parity", action="store_true", help="skip the parity check")
    p.add_argument("--keep-tflite", action="store_true", help="also write OUT/tflite/*.tflite")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt pickle weights")
    a = p.parse_args(argv)
    # every argument is validated before the (slow, optional) LiteRT toolchain is imported
    prec = resolve_precision(a.preset, a.precision, ALLOWED, "LiteRT-LM")
    if not 8 <= a.max_len <= 1 << 20:
        raise ConfigError(f"--max-len must be in 8..{1 << 20}, got {a.max_len}")
    if not 1 <= a.parity_tokens < a.max_len:
        raise ConfigError(f"--parity-tokens must be in 1..{a.max_len - 1}, got {a.parity_tokens}")
    if a.min_match is not None and not 0.0 <= a.min_match <= 1.0:
        raise ConfigError(f"--min-match must be in [0, 1], got {a.min_match}")
    lens = parse_lens(a.prefill, a.max_len)
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not a.force:
        raise ConfigError(
            f"{out} exists and is not an empty folder; choose another or pass --force"
        )
    litert_env.require_converter()
    from ..hub import resolve
    from ..tokenization import load_tokenizer
    from ..weights import load_config, load_model

    folder = Path(resolve(a.model))
    cfg = load_config(folder, a.image_size)
    model = load_model(folder, device="cpu", dtype=torch.float32, trust_pickle=a.trust_pickle,
                       config=cfg)  # fmt: skip
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    examples = Path(__file__).resolve().parents[2] / "examples" / "shapes3.png"
    tok = load_tokenizer(folder)
    files, res = export_litertlm(model.eval(), out, prec, tok, folder / "tokenizer.json",
                                 max_len=a.max_len, prefill_lens=lens, parity=not a.no_parity,
                                 parity_tokens=a.parity_tokens, min_match=a.min_match,
                                 image_src=examples, keep_tflite=a.keep_tflite)  # fmt: skip
    for name, n in files.items():
        print(f"  {name:32s} {n / 1e6:10.2f} MB")
    if res is not None:
        print(res)
        return 0 if res.passed else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
