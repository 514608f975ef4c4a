"""Build mlx-vlm's FastVLM model (`mlx_vlm.models.fastvlm`) for a checkpoint folder of any format.

* MLX-layout folders (mlx-community conversions, `fastvlm convert --to mlx`, bf16 or affine
  2-8 bit) and Apple `llava_qwen2` folders load directly: mlx-vlm's own `sanitize` methods and
  `load_model_weights` (quantization, strict key check) do the work, as in `mlx_vlm.load`.
* transformers `fast_vlm` and our own `fastvlm` folders are converted once, with this package's
  bit-exact rename tables (`weights.convert_checkpoint(..., "mlx")`), into a cache folder keyed
  by the source files, so the user never converts by hand.

mlx-vlm keeps the FastViTHD shape (stage depths / widths) as class attributes of its
`VisionConfig` rather than config fields, so `mlx_vlm.load` always builds the released tower;
`model_config` sets them on the instance from our config, which lets small test towers load too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..config import FastVLMConfig
from ..errors import CheckpointError, ConfigError
from ..mlx_format import (
    HEAD_PROJECTION_DIM,
    MLX_INSTALL,
    check_not_app_bundle,
    is_mlx_layout,
    read_config,
)
from ..safetensors_rows import peek_keys_and_shapes
from ..weights import convert_checkpoint, load_config, weight_files

UNSUPPORTED = "not supported on the mlx backend: "


def check_supported(cfg: FastVLMConfig) -> None:
    """What mlx-vlm's FastVLM hard-codes; anything else would load and compute the wrong thing."""
    v, t = cfg.vision, cfg.text
    problems = []
    if v.head_dim != 32:
        problems.append(f"vision attention head_dim {v.head_dim} (mlx-vlm uses 32)")
    if v.layer_norm_eps != 1e-5:
        problems.append(f"vision layer_norm_eps {v.layer_norm_eps} (mlx-vlm uses 1e-5)")
    if not v.inference_mode:
        problems.append("an unfused (train-time) vision tower")
    if t.head_dim != t.hidden_size // t.num_attention_heads:
        problems.append(f"decoder head_dim {t.head_dim} != hidden_size / num_attention_heads")
    if not t.attention_bias:
        problems.append("a decoder without q/k/v biases")
    if cfg.quantization:
        problems.append(
            "fastvlm int8/int4-quantized folders (load the float checkpoint, or make an MLX "
            "quantized copy: fastvlm convert SRC DST --to mlx --q-bits 4)"
        )
    if problems:
        raise ConfigError(UNSUPPORTED + "; ".join(problems))


def model_config(cfg: FastVLMConfig, projection_dim: int = HEAD_PROJECTION_DIM):
    """Our config → mlx-vlm's `ModelConfig`, tower shape set on the vision config instance."""
    from mlx_vlm.models import fastvlm as mv

    t, v = cfg.text, cfg.vision
    eos = t.eos_token_id
    text = mv.TextConfig(
        model_type="qwen2",
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        intermediate_size=t.intermediate_size,
        num_attention_heads=t.num_attention_heads,
        rms_norm_eps=t.rms_norm_eps,
        vocab_size=t.vocab_size,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        rope_traditional=False,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    vision = mv.VisionConfig(model_type="llava_qwen2", projection_dim=projection_dim)
    n = len(v.layers)
    vision.layers = list(v.layers)
    vision.embed_dims = list(v.embed_dims)
    vision.mlp_ratios = list(v.mlp_ratios)
    vision.token_mixers = tuple(v.token_mixers)
    vision.pos_embs_shapes = [(7, 7) if p else None for p in v.pos_embs]
    vision.downsamples = [True] * n
    vision.down_patch_size = v.down_patch_size
    vision.down_stride = v.down_stride
    vision.repmixer_kernel_size = v.repmixer_kernel_size
    vision.cls_ratio = v.cls_ratio
    return mv.ModelConfig(
        text_config=text,
        vision_config=vision,
        model_type="llava_qwen2",
        image_token_index=cfg.image_token_id,
        eos_token_id=eos[0] if isinstance(eos, list) and eos else (eos or 0),
        mm_projector_type=cfg.mm_projector_type,
        mm_hidden_size=v.hidden_size,
        tokenizer_model_max_length=None,
    )


def cache_root() -> Path:
    """Where converted folders live: $FASTVLM_MLX_CACHE, else ~/.cache/fastvlm/mlx."""
    env = os.environ.get("FASTVLM_MLX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastvlm" / "mlx"


def _fingerprint(folder: Path, files: list[Path]) -> str:
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted([folder / "config.json", *files]):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def mlx_folder(folder: Path, trust_pickle: bool = False) -> Path:
    """`folder` itself when mlx-vlm reads it (MLX layout or Apple), else its cached conversion."""
    folder = Path(folder)
    files = weight_files(folder, trust_pickle)
    cfg = load_config(folder)
    check_supported(cfg)
    keys = peek_keys_and_shapes(files)
    check_not_app_bundle(folder, keys)
    pickled = any(f.suffix != ".safetensors" for f in files)
    if (cfg.format == "apple" and not pickled) or is_mlx_layout(keys):
        return folder
    dst = cache_root() / _fingerprint(folder, files)
    if (dst / "config.json").exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Convert beside the final place and rename: a concurrent or killed load never sees half.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dst.parent))
    try:
        convert_checkpoint(folder, tmp / "m", "mlx", trust_pickle=trust_pickle)
        os.replace(tmp / "m", dst)
    except OSError:
        if not (dst / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def load_mlx_model(
    folder: Path, dtype: str | None = None, *, image_size: int | None = None,
    trust_pickle: bool = False,
):  # fmt: skip
    """(mlx-vlm FastVLM `Model`, our `FastVLMConfig`) for a checkpoint folder of any format."""
    try:
        import mlx.core as mx
        from mlx_vlm.models import fastvlm as mv
        from mlx_vlm.utils import load_model_weights
    except ImportError as e:
        raise ConfigError(f"the mlx backend needs mlx and mlx-vlm ({e}): {MLX_INSTALL}") from e

    src = mlx_folder(Path(folder), trust_pickle)
    cfg = load_config(src, image_size)
    config = read_config(src)
    weights: dict = {}
    for f in weight_files(src):
        weights.update(mx.load(str(f)))
    emb = next(
        (w for k, w in weights.items() if k.endswith("embed_tokens.weight")), None
    )
    if emb is not None:  # rows as stored (vocabularies are padded differently per export)
        cfg.text.vocab_size = emb.shape[0]
    head = next((w for k, w in weights.items() if k.endswith("head.proj")), None)
    model = mv.Model(model_config(cfg, head.shape[-1] if head is not None else HEAD_PROJECTION_DIM))
    weights = model.sanitize(weights)
    weights = model.vision_tower.sanitize(weights)
    weights = model.language_model.sanitize(weights)
    weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    head_key = "vision_tower.vision_model.head.proj"
    if head_key not in weights:  # torch-side folders drop the unused CLIP head; mlx-vlm wants one
        weights[head_key] = mx.zeros(model.vision_tower.vision_model.head.proj.shape)
    config.setdefault("vision_config", {})
    try:
        model = load_model_weights(model, config, weights, src)
    except ValueError as e:
        raise CheckpointError(f"{folder}: the weights do not match the mlx model: {e}") from e
    if dtype not in (None, "auto"):
        _cast(model, dtype)
    return model, cfg


def _cast(model, dtype: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map

    names = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
    names.update(fp32=mx.float32, bf16=mx.bfloat16, fp16=mx.float16)
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r} for the mlx backend: use {sorted(names)}")
    to = names[dtype]

    def cast(a):
        return a.astype(to) if mx.issubdtype(a.dtype, mx.floating) else a

    model.update(tree_map(cast, model.parameters()))
    mx.eval(model.parameters())


def describe_dtype(model) -> str:
    """Human-readable weight precision ("float32", "bfloat16", "int4 (affine g64)")."""
    import mlx.nn as nn

    cfg_bits = {
        (m.bits, m.group_size)
        for _, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    emb = model.vision_tower.vision_model.conv_exp.reparam_conv.weight.dtype
    float_name = str(emb).split(".")[-1]
    if not cfg_bits:
        return float_name
    bits = "/".join(f"int{b} (affine g{g})" for b, g in sorted(cfg_bits))
    return f"vision={float_name},decoder={bits}"
