"""MLX-layout checkpoints (mlx-vlm / mlx-community FastVLM folders): read into torch, write them.

The layout is what `mlx_vlm.convert` writes for Apple's `llava_qwen2` models: names
`vision_tower.vision_model.*` (stem under `patch_embed.blocks.N`), `mm_projector.{0,2}.*`,
`language_model.model.*` (+ `language_model.lm_head.*` when untied); convolution weights stored
channels-last (O, kH, kW, I) and layer scales as (1, 1, C), because MLX convolutions are NHWC.
Quantized folders replace a Linear/Embedding `weight` by packed uint32 codes plus per-group
`scales` and `biases` (affine: w = scale * q + bias, `config.json` "quantization").

Reading dequantizes exactly as `mx.dequantize` does (both products rounded in the scales' dtype),
so no MLX install is needed to run these folders on torch. Writing float weights needs only torch;
`q_bits` quantizes with MLX's own `mx.quantize` (so mlx-vlm reads back exactly what it would have
written) and therefore needs `mlx`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import FastVLMConfig
from .config_format import config_to_format
from .errors import CheckpointError, ConfigError

# (pattern, replacement): MLX key -> internal key (see model/fastvlm.py for internal names).
MLX_RULES: list[tuple[str, str]] = [
    (r"^vision_tower\.vision_model\.patch_embed\.blocks\.", "vision_tower.patch_embed."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
MLX_INVERSE: list[tuple[str, str]] = [
    (r"^vision_tower\.", "vision_tower.vision_model."),
    (r"^(vision_tower\.vision_model\.patch_embed)\.", r"\1.blocks."),
    (r"^language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
QUANT_SUFFIXES = (".scales", ".biases")
# mlx-vlm's vision model always has a CLIP projection head (unused by the VLM); its default width.
HEAD_PROJECTION_DIM = 768
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
MLX_INSTALL = 'pip install "fastvlm[mlx]" (mlx + mlx-vlm)'


def _rename(rules: list[tuple[str, str]], key: str) -> str:
    """Ordered rewrites, each applied once (as weights.KeyMap's tables)."""
    for pat, rep in rules:
        key = re.sub(pat, rep, key)
    return key


def is_mlx_layout(keys) -> bool:
    """True for folders in mlx-vlm's naming (Apple's own start with `model.`)."""
    return any(k.startswith(("vision_tower.vision_model.", "language_model.model.")) for k in keys)


def _is_vision_tensor(internal_key: str) -> bool:
    return internal_key.startswith("vision_tower.")


def to_torch_layout(internal_key: str, t: torch.Tensor) -> torch.Tensor:
    """An MLX-layout tensor → the torch module's layout (NHWC conv kernels → NCHW)."""
    if _is_vision_tensor(internal_key):
        if t.ndim == 4:
            return t.permute(0, 3, 1, 2)  # (O, kH, kW, I) -> (O, I, kH, kW)
        if "layer_scale" in internal_key and t.ndim == 3:
            return t.permute(2, 0, 1)  # (1, 1, C) -> (C, 1, 1)
    return t


def to_mlx_layout(internal_key: str, t: torch.Tensor) -> torch.Tensor:
    if _is_vision_tensor(internal_key):
        if t.ndim == 4:
            return t.permute(0, 2, 3, 1)
        if "layer_scale" in internal_key and t.ndim == 3:
            return t.permute(1, 2, 0)
    return t


# ---------------------------------------------------------------------- reading
def quantization_of(config: dict, module: str | None = None) -> dict | None:
    """Affine {"group_size", "bits"} of the folder (or of one module: mlx-vlm's mixed recipes
    store per-module overrides keyed by path), None when float; other modes are refused."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return None
    if module is not None and isinstance(q.get(module), dict):
        q = {**q, **q[module]}
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise ConfigError(
            f"MLX quantization mode {mode!r} is not supported on the torch backend "
            "(affine 2-8 bit only); run this folder with backend='mlx'"
        )
    bits, group = int(q.get("bits", 4)), int(q.get("group_size", 64))
    if bits not in SUPPORTED_BITS or group < 1:
        raise ConfigError(f"unsupported MLX quantization bits={bits} group_size={group}")
    return {"bits": bits, "group_size": group}


def check_not_app_bundle(folder: Path, keys) -> None:
    """Apple's MLX-app checkpoints (apple/FastVLM-*-fp16 / -int8 / -int4) hold the decoder and
    projector in MLX layout but the vision tower only as a compiled Core ML package."""
    folder = Path(folder)
    if (folder / "fastvithd.mlpackage").exists() and not any("vision_tower" in k for k in keys):
        raise ConfigError(
            f"{folder} is Apple's MLX-app bundle: its vision tower ships only as a Core ML "
            "package (fastvithd.mlpackage), which runs inside Apple's Swift app, not here. Use "
            "the PyTorch checkpoint (apple/FastVLM-0.5B, -1.5B, -7B) on any backend, or an "
            "MLX conversion with the vision tower (mlx-community/FastVLM-0.5B-bf16, or "
            "`fastvlm convert SRC DST --to mlx --q-bits 8`)"
        )


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Affine-dequantize MLX-packed codes, bit-identical to `mx.dequantize`.

    `packed` (rows, cols·bits/32) uint32 holds the codes little-end first, bit-continuous across
    words (3/5/6-bit codes straddle words); scales/biases (rows, cols/group_size)."""
    words = packed.to(torch.int64).reshape(*packed.shape[:-1], -1)
    cols = words.shape[-1] * 32 // bits
    if scales.shape[-1] * group_size != cols:
        raise CheckpointError(
            f"quantized tensor of {cols} columns does not match {scales.shape[-1]} groups of "
            f"{group_size} (config.json quantization does not match the weights)"
        )
    # Unpack as a bit stream: code i occupies bits [i*bits, (i+1)*bits) of the row.
    bit_idx = torch.arange(cols, dtype=torch.int64) * bits
    word, shift = bit_idx // 32, bit_idx % 32
    lo = words[..., word] >> shift
    hi = torch.where(
        shift + bits > 32, words[..., (word + 1).clamp(max=words.shape[-1] - 1)] << (32 - shift), 0
    )
    codes = (lo | hi) & ((1 << bits) - 1)
    dt = scales.dtype
    q = codes.reshape(*codes.shape[:-1], -1, group_size).to(dt)
    # Two roundings in the scales' dtype, as MLX computes it (one fused rounding differs in bf16).
    w = q * scales.unsqueeze(-1) + biases.unsqueeze(-1)
    return w.reshape(*codes.shape)


def read_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {folder}/config.json: {e}") from e


def iter_mlx_tensors(files: list[Path], config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(MLX key, torch-layout tensor) pairs, quantized weights dequantized to the scales' dtype."""
    from safetensors import SafetensorError, safe_open

    quantization_of(config)  # refuse unsupported modes before reading anything
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
                for k in sorted(keys):
                    if k.endswith(QUANT_SUFFIXES):
                        continue
                    t = h.get_tensor(k)
                    base = k[: -len(".weight")] if k.endswith(".weight") else None
                    if base and f"{base}.scales" in keys:
                        quant = quantization_of(config, base)
                        if quant is None:
                            raise CheckpointError(
                                f"{k} is quantized but config.json has no 'quantization' entry"
                            )
                        t = dequantize(
                            t,
                            h.get_tensor(f"{base}.scales"),
                            h.get_tensor(f"{base}.biases"),
                            quant["bits"],
                            quant["group_size"],
                        )
                    yield k, to_torch_layout(_rename(MLX_RULES, k), t)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {f.name}: {e} (corrupt or truncated file?)") from e


# ---------------------------------------------------------------------- writing
def mlx_config(cfg: FastVLMConfig, head_dim: int, quant: dict | None) -> dict:
    """Apple's `llava_qwen2` config.json (what mlx-vlm reads) + the MLX-only keys."""
    d = config_to_format(cfg, "apple")
    vision = dict(d.get("vision_config") or {})
    vision.update(model_type="llava_qwen2", projection_dim=head_dim)
    d["vision_config"] = vision
    d.setdefault("eos_token_id", cfg.text.eos_token_id)
    if quant:
        d["quantization"] = d["quantization_config"] = {**quant, "mode": "affine"}
    return d


def _quantizable(internal_key: str, t: torch.Tensor, group_size: int) -> bool:
    """What mlx-vlm's converter quantizes: decoder/projector Linear and Embedding weights whose
    input width is a multiple of the group size; the vision tower stays float."""
    return (
        internal_key.endswith(".weight")
        and t.ndim == 2
        and not _is_vision_tensor(internal_key)
        and "norm" not in internal_key
        and t.shape[-1] % group_size == 0
    )


def save_mlx(
    state: dict[str, torch.Tensor],
    cfg: FastVLMConfig,
    folder: Path,
    *,
    q_bits: int | None = None,
    group_size: int = 64,
    dtype: torch.dtype | None = None,
) -> None:
    """Write internal-named tensors as an MLX-layout folder (weights + config.json).

    Float tensors are copied bit for bit (cast only with `dtype`); with `q_bits` the decoder and
    projector weights are affine-quantized by `mx.quantize`."""
    from safetensors.torch import save_file

    if q_bits is not None and q_bits not in SUPPORTED_BITS:
        raise ConfigError(f"--q-bits must be one of {SUPPORTED_BITS}, got {q_bits}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = cfg.text.tie_word_embeddings
    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        if k.endswith("num_batches_tracked") or (k == "lm_head.weight" and tied):
            continue
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        name = _rename(MLX_INVERSE, k)
        if q_bits is not None and _quantizable(k, t, group_size):
            out.update(_mx_quantize(name, t, q_bits, group_size))
        else:
            out[name] = to_mlx_layout(k, t).contiguous()
    head = "vision_tower.vision_model.head.proj"
    if head not in out:  # mlx-vlm loads strictly and always builds this (unused) head
        shape = (cfg.vision.hidden_size, HEAD_PROJECTION_DIM)
        out[head] = torch.zeros(shape, dtype=_float_dtype(out))
    quant = {"group_size": group_size, "bits": q_bits} if q_bits is not None else None
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    config = mlx_config(cfg, out[head].shape[-1], quant)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    emb = tensors.get("language_model.model.embed_tokens.scales")
    if emb is None:
        emb = tensors.get("language_model.model.embed_tokens.weight")
    return emb.dtype if emb is not None and emb.is_floating_point() else torch.float32


def _mx_quantize(name: str, t: torch.Tensor, bits: int, group_size: int) -> dict:
    try:
        import mlx.core as mx
    except ImportError as e:
        raise ConfigError(f"--q-bits quantizes with MLX, which is missing: {MLX_INSTALL}") from e
    base = name[: -len(".weight")]
    w = to_mx(t)
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    return {name: from_mx(q), f"{base}.scales": from_mx(s), f"{base}.biases": from_mx(b)}


def to_mx(t: torch.Tensor):
    """torch → mx.array, bit-exact (bfloat16 travels as its raw 16-bit pattern)."""
    import mlx.core as mx

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(t.numpy())


def from_mx(a) -> torch.Tensor:
    """mx.array → torch, bit-exact."""
    import mlx.core as mx
    import numpy as np

    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))
