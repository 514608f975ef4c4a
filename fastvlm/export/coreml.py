"""`fastvlm export coreml MODEL OUT`: Core ML packages for the whole model, conversion on Linux.

Output (minimum deployment target iOS 18 / macOS 15, ML programs):

    OUT/vision_encoder.mlpackage  pixel_values (1, 3, S, S) float32 → image_embeds (1, tokens, D)
    OUT/embed_tokens.mlpackage    input_ids (1, T) int32 → inputs_embeds (1, T, D)
    OUT/decoder.mlpackage         inputs_embeds (1, T, D), causal_mask (1, 1, T, P+T) float16
                                  → logits (1, T, V); states key_cache / value_cache
                                  (layers, 1, kv, context, hd) hold the KV cache
    OUT/config.json  tokenizer.json  fastvlm_export.json  README.md

Design decisions:
* The decoder is a *stateful* model (coremltools ≥ 8 `StateType`, Apple's stateful Llama
  recipe): the KV cache lives in two registered buffers updated in place, so one prediction per
  token moves no cache through the API. P (cached tokens) = causal_mask.shape[-1] - T.
* Compression runs on the converted ML program (coremltools.optimize.coreml, works on Linux):
  int8 = per-channel symmetric linear weights, int4 = per-block (32) symmetric linear weights,
  pal4/pal6/pal8 = k-means palettized vision weights.
* Core ML predictions need macOS (libcoremlpython). On Linux the parity check runs the traced
  PyTorch wrappers (what was converted: stateful cache updates, masks) against the model, and the
  saved packages are re-loaded and checked for I/O names, shapes, states and compressed ops; the
  output says so. On macOS the packages themselves are run (vision embeddings + greedy tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .onnx import ExportResult, add_common_args, load_source, prepare_out, print_result
from .precision import as_precision, describe, resolve_precision
from .wrappers import EmbedTokens, StatefulDecoder, VisionEncoder, export_friendly

ALLOWED = {
    "vision": ("fp32", "fp16", "int8", "pal4", "pal6", "pal8"),
    "projector": ("fp32", "fp16", "int8", "pal4", "pal6", "pal8"),
    "embed": ("fp32", "fp16"),
    "llm": ("fp32", "fp16", "int8", "int4"),
}
DEFAULT_CONTEXT = 2048
COMPRESSED_OPS = ("constexpr_blockwise_shift_scale", "constexpr_lut_to_dense",
                  "constexpr_affine_dequantize")  # fmt: skip


def _ct():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError as e:
        raise ConfigError(
            "Core ML export needs coremltools ≥ 8: pip install 'fastvlm[export]'"
        ) from e
    if int(ct.__version__.split(".")[0]) < 8:
        raise ConfigError(
            f"coremltools {ct.__version__} is too old: the stateful decoder needs ≥ 8"
        )
    return ct


def can_predict() -> bool:
    """True where Core ML can run predictions (macOS with coremltools' native library)."""
    try:
        from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
    except Exception:
        return False
    return sys.platform == "darwin"


def _compress(ct, mlmodel, kind: str):
    from coremltools.optimize import coreml as cto

    if kind in ("fp32", "fp16"):
        return mlmodel
    if kind == "int8":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=2048
        )
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if kind == "int4":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4",
                                         granularity="per_block", block_size=32,
                                         weight_threshold=2048)  # fmt: skip
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    if kind.startswith("pal"):
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=int(kind[3:]), weight_threshold=2048)
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    raise AssertionError(kind)


def _convert(ct, program, inputs, outputs, precision: str, states=None):
    fp16 = precision != "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            program,
            inputs=inputs,
            outputs=outputs,
            states=states,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
            minimum_deployment_target=ct.target.iOS18,
            skip_model_load=True,  # nothing to load on Linux; validated from the spec instead
        )


def _io(spec) -> dict:
    def arr(f):
        t = f.type
        if t.HasField("stateType"):
            a = t.stateType.arrayType
        else:
            a = t.multiArrayType
        shape = list(a.shape)
        rng = [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges] if (
            not t.HasField("stateType") and a.HasField("shapeRange")) else None  # fmt: skip
        return {"shape": shape, "ranges": rng}

    d = spec.description
    return {
        "inputs": {f.name: arr(f) for f in d.input},
        "outputs": {f.name: arr(f) for f in d.output},
        "states": {f.name: arr(f) for f in d.state},
    }


def validate_package(path: Path) -> dict:
    """Re-load a saved .mlpackage's spec (works on Linux): I/O, states and op histogram."""
    ct = _ct()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ConfigError(f"{path} is not an ML program")
    ops: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    return {"spec_version": spec.specificationVersion, **_io(spec), "ops": ops}


def export_coreml(
    model,
    out: str | Path,
    precision: str | dict[str, str] | None = None,
    tokenizer=None,
    *,
    context: int = DEFAULT_CONTEXT,
    parity: bool = True,
    log=print,
) -> ExportResult:
    ct = _ct()
    from .onnx import write_folder

    prec = as_precision(precision, ALLOWED, "Core ML")
    if prec["projector"] != prec["vision"]:
        log(f"  note: projector follows vision in Core ML ({prec['vision']})")
        prec["projector"] = prec["vision"]
    if prec["llm"] == "fp32":  # Core ML state tensors must be fp16
        log("  note: the stateful decoder is fp16 at least in Core ML (llm=fp32 → fp16)")
        prec["llm"] = "fp16"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    cfg, t = model.config, model.config.text
    context = min(context, t.max_position_embeddings)
    t0 = time.perf_counter()
    log(f"exporting Core ML ({describe(prec)}, context {context}) to {out}")
    # ---- vision (torch.export: the TorchScript frontend trips on FastViTHD's attention shapes)
    s = cfg.vision.image_size
    px = torch.zeros(1, 3, s, s)
    with torch.no_grad():
        ep = torch.export.export(VisionEncoder(model), (px,)).run_decompositions({})
    vis = prec["vision"]
    ml = _convert(ct, ep, [ct.TensorType(name="pixel_values", shape=px.shape)],
                  [ct.TensorType(name="image_embeds")], vis)  # fmt: skip
    _compress(ct, ml, vis).save(str(out / "vision_encoder.mlpackage"))
    log(f"  vision_encoder.mlpackage ({vis}) {time.perf_counter() - t0:.1f}s")
    # ---- token embeddings
    t1 = time.perf_counter()
    seq = ct.RangeDim(1, context, default=1)
    with torch.no_grad():
        tr = torch.jit.trace(EmbedTokens(model), (torch.zeros(1, 4, dtype=torch.int32),))
    ml = _convert(ct, tr, [ct.TensorType(name="input_ids", shape=(1, seq), dtype=np.int32)],
                  [ct.TensorType(name="inputs_embeds")], prec["embed"])  # fmt: skip
    ml.save(str(out / "embed_tokens.mlpackage"))
    log(f"  embed_tokens.mlpackage ({prec['embed']}) {time.perf_counter() - t1:.1f}s")
    # ---- stateful decoder
    t1 = time.perf_counter()
    dec = StatefulDecoder(model, context)
    q = ct.RangeDim(1, context, default=1)
    k = ct.RangeDim(1, context, default=1)
    with torch.no_grad(), export_friendly(model):
        tr = torch.jit.trace(dec, (torch.zeros(1, 3, t.hidden_size), torch.zeros(1, 1, 3, 5)))
    fp = np.float16  # Core ML state must be fp16
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=dec.key_cache.shape, dtype=fp),
                     name="key_cache"),
        ct.StateType(wrapped_type=ct.TensorType(shape=dec.value_cache.shape, dtype=fp),
                     name="value_cache"),
    ]  # fmt: skip
    ml = _convert(
        ct, tr,
        [ct.TensorType(name="inputs_embeds", shape=(1, q, t.hidden_size), dtype=fp),
         ct.TensorType(name="causal_mask", shape=(1, 1, q, k), dtype=fp)],
        [ct.TensorType(name="logits", dtype=fp)], prec["llm"], states,
    )  # fmt: skip
    _compress(ct, ml, prec["llm"]).save(str(out / "decoder.mlpackage"))
    del ml, tr
    log(f"  decoder.mlpackage ({prec['llm']}) {time.perf_counter() - t1:.1f}s")
    write_folder(model, tokenizer, out, prec, opset=0)
    files = {"vision": "vision_encoder.mlpackage", "embed": "embed_tokens.mlpackage",
             "decoder": "decoder.mlpackage"}  # fmt: skip
    manifest = json.loads((out / "fastvlm_export.json").read_text())
    manifest.update(format="coreml", files=files, opset=None, context=context)
    manifest["packages"] = {k: validate_package(out / v) for k, v in files.items()}
    res = ExportResult(out, prec, seconds=time.perf_counter() - t0)
    for v in files.values():
        res.files[v] = sum(f.stat().st_size for f in (out / v).rglob("*") if f.is_file())
    if parity:
        res.parity = coreml_parity(model, dec, tokenizer, prec, out)
        manifest["parity"] = res.parity.to_dict()
    (out / "fastvlm_export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(readme(cfg, prec, context, manifest, res))
    return res


def _torch_stateful_greedy(dec: StatefulDecoder, model, ids, px, n: int) -> list[int]:
    """Greedy decode through the (unconverted) stateful wrapper: prefill, then one token a call."""
    if len(ids) + n > dec.key_cache.shape[3]:
        raise ConfigError(
            f"parity prompt ({len(ids)} tokens) + {n} tokens exceed --context "
            f"{dec.key_cache.shape[3]}: raise --context or pass --no-parity"
        )
    dec.key_cache.zero_()
    dec.value_cache.zero_()
    with torch.no_grad():
        x = model.embed(torch.tensor([ids]), model.embed_images(px))
        t = x.shape[1]
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        logits = dec(x, mask)
        out = []
        for i in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            x = model.embed(torch.tensor([[tok]]))
            logits = dec(x, torch.zeros(1, 1, 1, t + i + 1))
    return out


def coreml_parity(model, dec, tokenizer, prec, out: Path):
    from . import parity as parity_mod

    if can_predict():  # pragma: no cover - macOS only
        ct = _ct()
        vis = ct.models.MLModel(str(out / "vision_encoder.mlpackage"))

        def embed_images(px):
            return vis.predict({"pixel_values": px.numpy()})["image_embeds"]

        rep = parity_mod.check(model, tokenizer, "coreml", prec, embed_images=embed_images)
        rep.notes.append("Core ML predictions: vision encoder; decoder checked via PyTorch wrapper")
        return rep
    rep = parity_mod.check(
        model, tokenizer, "coreml (traced PyTorch wrappers, fp32)",
        {k: "fp32" for k in prec},
        greedy=lambda ids, px, n: _torch_stateful_greedy(dec, model, ids, px, n),
    )  # fmt: skip
    rep.precision = dict(prec)
    rep.notes.append(
        "Linux: Core ML cannot run predictions here (no libcoremlpython). Checked instead: the "
        "converted wrappers in PyTorch (stateful KV cache, masks) and each saved package's spec "
        "(I/O names, shapes, states, compressed weight ops) — run this export on macOS for "
        "numerical parity of the Core ML packages and their fp16/int4 error"
    )
    return rep


def readme(cfg, prec, context, manifest, res) -> str:
    t = cfg.text
    return f"""# FastVLM — Core ML export (fastvlm)

Precision `{describe(prec)}`, context {context} tokens, iOS 18 / macOS 15 ML programs.

| package | inputs | outputs / states |
|---|---|---|
| vision_encoder.mlpackage | pixel_values (1, 3, {cfg.vision.image_size}, \
{cfg.vision.image_size}) | image_embeds (1, {cfg.num_image_tokens}, {t.hidden_size}) |
| embed_tokens.mlpackage | input_ids int32 (1, T) | inputs_embeds (1, T, {t.hidden_size}) |
| decoder.mlpackage | inputs_embeds (1, T, {t.hidden_size}), causal_mask (1, 1, T, P+T) \
(0 = attend, -inf = masked) | logits (1, T, {t.vocab_size}); states key_cache / value_cache \
({t.num_hidden_layers}, 1, {t.num_key_value_heads}, {context}, {t.head_dim}) |

On macOS (Python, coremltools ≥ 8):

```python
import coremltools as ct, numpy as np
dec = ct.models.MLModel("decoder.mlpackage"); state = dec.make_state()
# prefill T prompt embeddings (image rows replaced by image_embeds), P = 0:
mask = np.triu(np.full((T, T), -np.inf, np.float16), 1)[None, None]
logits = dec.predict({{"inputs_embeds": x, "causal_mask": mask}}, state=state)["logits"]
# then one token at a time: causal_mask zeros (1, 1, 1, P+1)
```

Parity at export time:

```
{res.parity or "(skipped)"}
```
"""


@contextlib.contextmanager
def third_party_quiet(verbose: bool = False):
    """coremltools' import notices, per-pass progress bars and warnings all go to sys.stderr:
    hidden unless `verbose` (our own progress lines go to stdout)."""
    if verbose:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastvlm export coreml", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help="KV-cache length of the stateful decoder (default 2048)")  # fmt: skip
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show coremltools' own warnings and progress bars")  # fmt: skip
    a = p.parse_args(argv)
    prec = resolve_precision(a.preset, a.precision, ALLOWED, "Core ML")
    with third_party_quiet(a.verbose):
        _ct()
        out = Path(a.out)
        prepare_out(out, a.force)
        model, tok, _ = load_source(a)
        res = export_coreml(model, out, prec, tok, context=a.context, parity=not a.no_parity)

    def dims(v: dict) -> str:
        if v["ranges"]:
            return "[" + ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in v["ranges"]) + "]"
        return str(v["shape"]) if v["shape"] else "[dynamic]"

    for name, info in json.loads((out / "fastvlm_export.json").read_text())["packages"].items():
        io = ", ".join(f"{k}{dims(v)}" for k, v in info["inputs"].items())
        oo = ", ".join(f"{k}{dims(v)}" for k, v in info["outputs"].items())
        st = ", ".join(f"{k}{dims(v)}" for k, v in info["states"].items())
        print(f"  {name}: {io} → {oo}" + (f"; state {st}" if st else ""))
    if not can_predict():
        print("  note: Core ML predictions need macOS; on Linux only the specs and the traced "
              "PyTorch wrappers were checked (see README of the export)")  # fmt: skip
    return print_result(res)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
