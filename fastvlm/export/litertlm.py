"""`fastvlm export litertlm MODEL OUT`: one `.litertlm` bundle for Google's LiteRT-LM runtime
(Android / iOS / desktop), the same container Google ships FastVLM-0.5B in.

OUT/model.litertlm holds: the LLM metadata proto (FastVLM model type, stop tokens, chat template
as Jinja with `<image_soft_token>`), the HF tokenizer, and three TFLite graphs built with
litert-torch (litertlm_model.py): the Qwen2 decoder with its KV cache (`prefill_<T>` / `decode`,
embeddings in), the token embedder, and the vision encoder + projector (NHWC image in).
Weights: `llm` fp32 / int8 / int4 (dynamic-range, litert-torch's generative recipes), `vision`
fp32 / fp16 / int8 (weight-only, ai-edge-quantizer).

Every export is checked (litertlm_run.py) unless --no-parity: greedy tokens of the graphs run in
ai-edge-litert's interpreter must equal PyTorch's for an image prompt and a text prompt, and,
when the LiteRT-LM Python API (`litert-lm-api`) is importable, the bundle's greedy reply must
equal PyTorch's text. Exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
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
    "embed": ("fp32",),
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


def quantize_vision(path: Path, precision: str) -> None:
    """Weight-only fp16 / int8 of the vision graph in place (ai-edge-quantizer)."""
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(str(path))
    fp16 = precision == "fp16"
    algo = AlgorithmName.FLOAT_CASTING if fp16 else AlgorithmName.MIN_MAX_UNIFORM_QUANT
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        try:
            q.add_weight_only_config(".*", op, 16 if fp16 else 8, algorithm_key=algo)
        except ValueError:  # an op this algorithm cannot take stays float
            pass
    path.write_bytes(bytes(q.quantize(enable_progress_report=False).quantized_model))


def parity_image(model, src: Path | None, dest: Path) -> Path:
    """An S×S PNG: LiteRT-LM stretches images to S×S while we pad to square first, so the
    check feeds both runtimes a picture that is already square and S wide."""
    from ..processing import expand2square, to_rgb

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


@dataclass
class LiteRTLMParity:
    rows: list[tuple[str, list[int] | str, list[int] | str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for *_, ok in self.rows)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "checks": [
                {"check": n, "pytorch": a, "litert": b, "match": ok} for n, a, b, ok in self.rows
            ],
            "notes": self.notes,
        }

    def __str__(self) -> str:
        lines = [
            f"{'PASS' if ok else 'FAIL'} {n}: pytorch={a!r} litert={b!r}"
            for n, a, b, ok in self.rows
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
) -> LiteRTLMParity:
    from ..processing import Processor, render_chat
    from .litertlm_run import InterpreterVLM, litertlm_greedy, torch_greedy

    res = LiteRTLMParity()
    proc = Processor(model.config, tokenizer)
    eos = set(stop_token_ids(model, tokenizer))
    img_path = parity_image(model, image_src, tmp / "parity.png")
    px = proc.pixels([str(img_path)])
    nhwc = px.permute(0, 2, 3, 1).numpy() * np.asarray(model.config.image_std) + np.asarray(
        model.config.image_mean
    )  # the [0, 1] picture LiteRT-LM's preprocessor produces
    run = InterpreterVLM(parts["decoder"], parts["embedder"], parts.get("vision"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(img_path)},
                                         {"type": "text", "text": PARITY_PROMPT}]}]  # fmt: skip
    prompt, _ = render_chat(msgs, "apple", model.config.system_prompt)
    ids = proc.tokenize(prompt, 1)
    ref = torch_greedy(model, ids, px, max_new, eos)
    got = run.greedy(ids, model.config.image_token_id, nhwc, max_new, eos)
    res.rows.append(("interpreter greedy ids (image prompt)", ref, got, ref == got))
    text_ids = proc.tokenize(f"<|im_start|>user\n{TEXT_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    ref_t = torch_greedy(model, text_ids, None, max_new, eos)
    got_t = run.greedy(text_ids, model.config.image_token_id, None, max_new, eos)
    res.rows.append(("interpreter greedy ids (text prompt)", ref_t, got_t, ref_t == got_t))
    if bundle_path is None:
        return res
    if not litert_env.have_runtime():
        res.notes.append("litert-lm-api not importable: bundle not run (pip install litert-lm-api)")
        return res

    def text(out: list[int]) -> str:
        return tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)

    lm_img = litertlm_greedy(bundle_path, PARITY_PROMPT, img_path, max_new, max_len)
    res.rows.append(
        ("LiteRT-LM greedy text (image prompt)", text(ref), lm_img, text(ref) == lm_img)
    )
    lm_txt = litertlm_greedy(bundle_path, tokenizer.decode(text_ids, skip_special_tokens=False),
                             None, max_new, max_len)  # fmt: skip
    res.rows.append(
        ("LiteRT-LM greedy text (text prompt)", text(ref_t), lm_txt, text(ref_t) == lm_txt)
    )
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


def export_litertlm(model, out, precision=None, tokenizer=None, tokenizer_json: Path | None = None,
                    *, max_len: int = 1024, prefill_lens=(128,), parity: bool = True,
                    parity_tokens: int = 16, image_src: Path | None = None, log=print):  # fmt: skip
    """Convert, bundle and check; returns (paths and sizes, parity or None)."""
    litert_env.require_converter()
    from .litertlm_model import convert_decoder, convert_embedder, convert_vision, reauthor_decoder

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
        parts = {"decoder": tmp / "decoder.tflite", "embedder": tmp / "embedder.tflite",
                 "vision": tmp / "vision_encoder.tflite"}  # fmt: skip
        decoder = reauthor_decoder(model, max_len)
        convert_decoder(decoder, max_len, list(prefill_lens), prec["llm"], parts["decoder"])
        convert_embedder(model, list(prefill_lens), parts["embedder"])
        convert_vision(model, parts["vision"])
        if prec["vision"] != "fp32":
            quantize_vision(parts["vision"], prec["vision"])
        write_metadata(tmp / "llm_metadata.pb", model, tokenizer, max_len)
        dest = bundle(out, parts, tmp / "llm_metadata.pb", Path(tokenizer_json))
        files = {p.name: p.stat().st_size for p in parts.values()}
        result = None
        if parity:
            result = check_parity(
                model, tokenizer, tmp, parts, dest, max_len, parity_tokens, image_src
            )
    files = {dest.name: dest.stat().st_size, **{f"({k} inside)": v for k, v in files.items()}}
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
    p.add_argument("--precision", default=None, help="e.g. vision=fp16,llm=int8 (embed stays fp32)")
    p.add_argument("--image-size", type=int, default=None, help="encoder resolution override")
    p.add_argument("--max-len", type=int, default=1024, help="KV-cache length (context) in tokens")
    p.add_argument("--prefill", default="128", help="prefill signature lengths, e.g. 32,128")
    p.add_argument("--parity-tokens", type=int, default=16, help="greedy tokens compared")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt pickle weights")
    a = p.parse_args(argv)
    prec = resolve_precision(a.preset, a.precision, ALLOWED, "LiteRT-LM")
    if a.max_len < 8:
        raise ConfigError(f"--max-len must be at least 8, got {a.max_len}")
    if a.parity_tokens < 1:
        raise ConfigError(f"--parity-tokens must be at least 1, got {a.parity_tokens}")
    lens = parse_lens(a.prefill, a.max_len)
    litert_env.require_converter()
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        if not a.force:
            raise ConfigError(f"{out} exists and is not empty; choose a new folder or pass --force")
        import shutil

        shutil.rmtree(out)
    from ..hub import resolve
    from ..tokenization import load_tokenizer
    from ..weights import load_config, load_model

    folder = Path(resolve(a.model))
    cfg = load_config(folder, a.image_size)
    model = load_model(
        folder, device="cpu", dtype=torch.float32, trust_pickle=a.trust_pickle, config=cfg
    )
    examples = Path(__file__).resolve().parents[2] / "examples" / "shapes3.png"
    tok = load_tokenizer(folder)
    files, res = export_litertlm(model.eval(), out, prec, tok, folder / "tokenizer.json",
                                 max_len=a.max_len, prefill_lens=lens, parity=not a.no_parity,
                                 parity_tokens=a.parity_tokens, image_src=examples)  # fmt: skip
    for name, n in files.items():
        print(f"  {name:32s} {n / 1e6:10.2f} MB")
    if res is not None:
        print(res)
        return 0 if res.passed else 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
