"""`fastvlm export onnx MODEL OUT`: three ONNX graphs in the onnx-community layout + parity.

Output folder (onnx-community layout, see onnx_community.py; `fastvlm.load(OUT)` runs it on
ONNX Runtime, transformers.js loads it as is). File names carry the dtype suffix
transformers.js looks for (`_fp16`, `_quantized` = int8, `_q4` = int4):

    OUT/config.json (llava_qwen2 + transformers.js_config)  tokenizer.json  tokenizer_config.json
    OUT/preprocessor_config.json  processor_config.json  generation_config.json  README.md
    OUT/fastvlm_export.json (precision, file names, parity)
    OUT/onnx/vision_encoder*.onnx        pixel_values (N, 3, S, S) → image_features (N, tok, D),
                                         vision_features (N, tok, C) (pre-projector)
    OUT/onnx/embed_tokens*.onnx          input_ids (B, T) → inputs_embeds (B, T, D)
    OUT/onnx/decoder_model_merged*.onnx  inputs_embeds, attention_mask, position_ids,
                                         past_key_values.{i}.key/value → logits, present.{i}.*
    OUT/onnx/mm_projector*.onnx          vision_features (N, K, C) → image_features (N, K, D):
                                         token reduction pools vision_features, then this

Design decisions:
* The TorchScript exporter (`dynamo=False`) traces the wrappers of wrappers.py: it handles the
  variable-length KV-cache inputs (empty past on the first call) with plain `dynamic_axes`, takes
  seconds, and its output runs unchanged on every ONNX Runtime version we tried.
* Precision is applied on the ONNX graphs, after export, with ONNX Runtime's own tools:
  fp16 = `float16.convert_float_to_float16(keep_io_types=True)` (I/O stays fp32, so one runtime
  serves every preset); int8 / int4 decoder = `MatMulNBitsQuantizer` (weight-only, asymmetric
  with per-block zero points, block 32, lm_head included). After fp16 conversion onnx_casts.py
  reshapes the converter's casts so every mix loads in onnxruntime-node (transformers.js) too.
  Graphs over 1.5 GB keep their weights in one `*.onnx_data` file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .precision import as_precision, describe, resolve_precision
from .onnx_casts import tidy_casts
from .onnx_community import FOLDER_README, VISION_FEATURES, file_names, write_side_files
from .wrappers import (
    DecoderStep,
    EmbedTokens,
    Projector,
    VisionEncoderWithFeatures,
    export_friendly,
    kv_names,
)

ALLOWED = {
    "vision": ("fp32", "fp16"),
    "projector": ("fp32", "fp16"),
    "embed": ("fp32", "fp16"),
    "llm": ("fp32", "fp16", "int8", "int4"),
}
DEFAULT_OPSET = 17
BLOCK_SIZE = 32
EXTERNAL_DATA_BYTES = 1_500_000_000
# MatMulNBits compute type: 4 = int8 activations × int4/int8 weights (ORT's fast CPU decode
# path, see docs/quantization.md); 0 keeps fp32 activations.
DEFAULT_ACCURACY_LEVEL = 4


@dataclass
class ExportResult:
    out: Path
    precision: dict[str, str]
    files: dict[str, int] = field(default_factory=dict)  # relative path → bytes
    parity: object | None = None  # ParityReport
    seconds: float = 0.0

    def size(self, prefix: str) -> int:
        return sum(n for p, n in self.files.items() if Path(p).name.startswith(prefix))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _export(module: torch.nn.Module, args: tuple, path: Path, names_in, names_out, dyn, opset):
    """TorchScript-export `module` to `path` (weights possibly in side files next to it)."""
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(names_in),
            output_names=list(names_out),
            dynamic_axes=dyn,
            do_constant_folding=True,
        )


def _save(model, path: Path) -> None:
    import onnx

    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        data = path.name + "_data"
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=1024,
        )
        (path.parent / data).chmod(0o644)  # onnx writes it 0600; the folder is meant to be shared
    else:
        onnx.save_model(model, str(path))


def _to_fp16(model, block: list[str] | None = None):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=block or None, disable_shape_infer=True
    )
    return tidy_casts(model)  # the converter's cast chains crash onnxruntime-node's optimizer


def _quantize(model, bits: int, accuracy_level: int | None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=False,
                             accuracy_level=accuracy_level)  # fmt: skip
    import logging

    level = logging.getLogger("onnxruntime.quantization").level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    try:
        q.process()
    finally:
        logging.getLogger("onnxruntime.quantization").setLevel(level)
    return q.model.model


def export_graphs(
    model,
    out: Path,
    precision: dict[str, str],
    opset: int = DEFAULT_OPSET,
    log=print,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
) -> None:
    """Write the three graphs of `model` (a FastVLMModel on CPU, fp32) under `out/onnx/`."""
    with export_friendly(model):
        _export_graphs(model, out, precision, opset, log, accuracy_level)


def _export_graphs(
    model,
    out: Path,
    precision: dict[str, str],
    opset: int = DEFAULT_OPSET,
    log=print,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
) -> None:
    import onnx

    if opset < 17:
        raise ConfigError("ONNX export needs opset ≥ 17")
    model = model.float().eval()
    cfg = model.config
    t = cfg.text
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        # ---- vision encoder + projector (+ the projector alone, for token reduction)
        names_out = file_names(precision)
        s = cfg.vision.image_size
        px = torch.zeros(1, 3, s, s)
        t0 = time.perf_counter()
        n_img = {0: "num_images"}
        _export(
            VisionEncoderWithFeatures(model),
            (px,),
            tmp / "vision.onnx",
            ["pixel_values"],
            ["image_features", VISION_FEATURES],
            {"pixel_values": n_img, "image_features": n_img, VISION_FEATURES: n_img},
            opset,
        )
        _export(
            Projector(model),
            (torch.zeros(1, cfg.num_image_tokens, cfg.vision.hidden_size),),
            tmp / "projector.onnx",
            [VISION_FEATURES],
            ["image_features"],
            {VISION_FEATURES: {0: "num_images", 1: "tokens"},
             "image_features": {0: "num_images", 1: "tokens"}},
            opset,
        )  # fmt: skip
        vis, proj = precision["vision"], precision["projector"]
        g = onnx.load(str(tmp / "vision.onnx"))
        if "fp16" in (vis, proj):
            names = [n.name for n in g.graph.node]
            block = [n for n in names if ("mm_projector" in n) == (vis == "fp16")]
            g = _to_fp16(g, block if vis != proj else None)
        _save(g, out / names_out["vision"])
        g = onnx.load(str(tmp / "projector.onnx"))
        _save(_to_fp16(g) if proj == "fp16" else g, out / names_out["projector"])
        del g
        log(f"  {names_out['vision']} ({vis}, projector {proj}) {time.perf_counter() - t0:.1f}s")
        # ---- token embeddings
        t0 = time.perf_counter()
        _export(
            EmbedTokens(model),
            (torch.zeros(1, 4, dtype=torch.long),),
            tmp / "embed.onnx",
            ["input_ids"],
            ["inputs_embeds"],
            {"input_ids": {0: "batch_size", 1: "sequence_length"},
             "inputs_embeds": {0: "batch_size", 1: "sequence_length"}},
            opset,
        )
        g = onnx.load(str(tmp / "embed.onnx"))
        if precision["embed"] == "fp16":
            g = _to_fp16(g)
        _save(g, out / names_out["embed"])
        del g
        log(f"  {names_out['embed']} ({precision['embed']}) {time.perf_counter() - t0:.1f}s")
        # ---- decoder (merged: prefill and decode, past may be empty)
        t0 = time.perf_counter()
        past_names, present_names = kv_names(t.num_hidden_layers)
        p = 2  # trace with a non-empty past so the concat is not specialised away
        past = [torch.zeros(1, t.num_key_value_heads, p, t.head_dim) for _ in past_names]
        args = (
            torch.zeros(1, 3, t.hidden_size),
            torch.ones(1, p + 3, dtype=torch.long),
            torch.arange(p, p + 3)[None],
            *past,
        )
        dyn = {
            "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
        }
        # transformers.js allocates the empty past from these names: `batch_size` is the symbol
        # it fills in, any other name becomes 0
        dyn |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names}
        dyn |= {n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names}
        _export(
            DecoderStep(model),
            args,
            tmp / "decoder.onnx",
            ["inputs_embeds", "attention_mask", "position_ids", *past_names],
            ["logits", *present_names],
            dyn,
            opset,
        )
        gc.collect()
        g = onnx.load(str(tmp / "decoder.onnx"))
        llm = precision["llm"]
        if llm in ("int8", "int4"):
            g = _quantize(g, 8 if llm == "int8" else 4, accuracy_level)
        elif llm == "fp16":
            g = _to_fp16(g)
        _save(g, out / names_out["decoder"])
        del g
        gc.collect()
        log(f"  {names_out['decoder']} ({llm}) {time.perf_counter() - t0:.1f}s")




def write_folder(model, tokenizer, out: Path, precision: dict[str, str], opset: int) -> dict:
    """The onnx-community side files (config, tokenizer, processors) and our manifest."""
    from .. import __version__
    from ..backends.ort import MANIFEST

    cfg = model.config
    write_side_files(cfg, tokenizer, out, precision)
    t = cfg.text
    manifest = {
        "format": "onnx",
        "fastvlm_version": __version__,
        "precision": precision,
        "opset": opset,
        "files": file_names(precision),
        "image_size": cfg.vision.image_size,
        "num_image_tokens": cfg.num_image_tokens,
        "image_token_id": cfg.image_token_id,
        "num_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "weight_block_size": BLOCK_SIZE if precision["llm"] in ("int8", "int4") else None,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_onnx(
    model,
    out: str | Path,
    precision: str | dict[str, str] | None = None,
    tokenizer=None,
    *,
    opset: int = DEFAULT_OPSET,
    parity: bool = True,
    min_agreement: float | None = None,
    threads: int | None = None,
    name: str = "FastVLM",
    log=print,
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL,
) -> ExportResult:
    """Export an in-memory `FastVLMModel` (fp32, CPU) to `out`; run the parity check.

    `precision`: a preset name ("quality", "balanced", "small"), a spec such as
    "vision=fp16,llm=int4" (applied on top of "quality"), or a resolved dict.
    """
    from .. import __version__
    from . import parity as parity_mod
    from ..backends.ort import MANIFEST, open_onnx
    from ..engine.sampling import SamplingParams

    prec = as_precision(precision, ALLOWED, "ONNX")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"exporting ONNX ({describe(prec)}) to {out}")
    export_graphs(model, out, prec, opset, log, accuracy_level)
    manifest = write_folder(model, tokenizer, out, prec, opset)
    if prec["llm"] in ("int8", "int4"):
        manifest["accuracy_level"] = accuracy_level
    res = ExportResult(out, prec, seconds=time.perf_counter() - t0)
    for f in sorted((out / "onnx").iterdir()):
        res.files[f"onnx/{f.name}"] = f.stat().st_size
    if parity:
        backend = open_onnx(out, tokenizer=tokenizer, intra_op_threads=threads)
        ort_model = backend.model

        def greedy(ids, px, n):
            return list(backend.submit(ids, px, SamplingParams(max_tokens=n, ignore_eos=True)))

        res.parity = parity_mod.check(
            model,
            tokenizer,
            "onnxruntime",
            prec,
            embed_images=ort_model.embed_images,
            logits=ort_model.logits,
            greedy=greedy,
            min_agreement=min_agreement,
        )
        manifest["parity"] = res.parity.to_dict()
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    t = model.config.text
    names = file_names(prec)
    readme = FOLDER_README.format(
        vision=names["vision"],
        embed=names["embed"],
        decoder=names["decoder"],
        projector=names["projector"],
        c=model.config.vision.hidden_size,
        side=math.isqrt(model.config.num_image_tokens),
        name=name,
        version=__version__,
        precision=describe(prec),
        s=model.config.vision.image_size,
        tok=model.config.num_image_tokens,
        d=t.hidden_size,
        v=t.vocab_size,
        kv=t.num_key_value_heads,
        hd=t.head_dim,
        last=t.num_hidden_layers - 1,
        image_id=model.config.image_token_id,
        mean=list(model.config.image_mean),
        std=list(model.config.image_std),
        out=out,
        parity=str(res.parity) if res.parity else "(skipped: --no-parity)",
    )
    (out / "README.md").write_text(readme)
    return res


# ---------------------------------------------------------------------- CLI
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder, Hugging Face repo id, or 'tiny' (embedded demo)")
    p.add_argument("out", help="output folder (created; must be empty or absent unless --force)")
    p.add_argument("--preset", choices=["quality", "balanced", "small"], default=None,
                   help="quality: all fp32; balanced: fp16 vision + int8 LLM; small: fp16 vision "
                   "+ int4 LLM (default: quality)")  # fmt: skip
    p.add_argument("--precision", default=None,
                   help="per-component override, e.g. vision=fp16,projector=fp16,llm=int4 "
                   "(components: vision, projector, embed, llm)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=None, help="encoder resolution override")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="teacher-forced greedy agreement floor (default by precision)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow .bin/.pt pickle weights")


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out} exists and is not empty; choose a new folder or pass --force")
        shutil.rmtree(out)


def load_source(a: argparse.Namespace):
    """(model fp32 on CPU, tokenizer, folder) for an export command."""
    from ..hub import resolve
    from ..tokenization import load_tokenizer
    from ..weights import load_config, load_model

    folder = Path(resolve(a.model))
    cfg = load_config(folder, a.image_size)
    model = load_model(folder, device="cpu", dtype=torch.float32, trust_pickle=a.trust_pickle,
                       config=cfg)  # fmt: skip
    return model.eval(), load_tokenizer(folder), folder


def print_result(res: ExportResult) -> int:
    for rel, n in res.files.items():
        print(f"  {rel:40s} {_mb(n):>12s}")
    print(f"  total {_mb(sum(res.files.values()))} in {res.seconds:.1f}s → {res.out}")
    if res.parity is not None:
        print(res.parity)
        return 0 if res.parity.passed else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastvlm export onnx", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (≥ 17)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--accuracy-level", type=int, default=DEFAULT_ACCURACY_LEVEL,
                   choices=[0, 1, 2, 3, 4], help="MatMulNBits compute type for int8/int4 "
                   "decoders: 4 = int8 activations (fast on CPU, default), 0 = fp32")  # fmt: skip
    a = p.parse_args(argv)
    prec = resolve_precision(a.preset, a.precision, ALLOWED, "ONNX")  # fail before loading
    out = Path(a.out)
    prepare_out(out, a.force)
    model, tok, folder = load_source(a)
    res = export_onnx(
        model, out, prec, tok, opset=a.opset, parity=not a.no_parity,
        min_agreement=a.min_agreement, threads=a.threads, name=folder.name,
        accuracy_level=a.accuracy_level,
    )  # fmt: skip
    return print_result(res)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
