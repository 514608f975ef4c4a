"""Checkpoint formats: detect, rename, load strictly, save.

Three formats map onto one internal naming (Apple's names minus wrapper prefixes, see
model/fastvlm.py):
* "apple"   — `llava_qwen2` repos: `model.vision_tower.vision_tower.model.*`,
              `model.mm_projector.*`, `model.{embed_tokens,layers,norm}.*`, `lm_head.*`.
              Pure prefix stripping.
* "hf"      — transformers `fast_vlm`: timm FastViT names under `model.vision_tower.timm_model.*`,
              `model.multi_modal_projector.linear_{1,2}.*`, `model.language_model.*`.
* "fastvlm" — our own: the internal names as they are.

Each format has one declarative, idempotent rule table (ordered regex rewrites, applied to a key
until none matches) and its inverse. The only config-dependent piece is the stage ↔ flat
`network.N` index map of FastViT, derived from the vision config (`network_index`).
Loading builds the model on the meta device and assigns tensors read from safetensors (no double
memory), after checking that the key sets and shapes match exactly. Pickle checkpoints are
refused unless the caller opts in with `trust_pickle=True`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import FastVLMConfig, VisionConfig, from_apple_dict, from_hf_dict
from .config_format import config_to_format, preprocessor_config
from .dtypes import dominant_dtype
from .errors import CheckpointError, ConfigError
from .mlx_format import (
    MLX_INVERSE,
    MLX_RULES,
    check_not_app_bundle,
    is_mlx_layout,
    iter_mlx_tensors,
    save_mlx,
)
from .model.fastvlm import FastVLMModel
from .quant.apply import finalize, prepare_for_load
from .quant.stream import CHUNK_BYTES, normalize_quant, plan_streamed
from .safetensors_rows import iter_entries, peek_keys_and_shapes, rows_of

JUNK = (
    re.compile(r"(^|\.)num_batches_tracked$"),
    re.compile(r"rotary_emb\.inv_freq$"),
    re.compile(r"^vision_tower\.head\."),  # MobileCLIP projection, unused by the VLM
)

# (pattern, replacement) pairs: format key -> internal key.
APPLE_RULES: list[tuple[str, str]] = [
    (r"^model\.vision_tower\.vision_tower\.model\.", "vision_tower."),
    (r"^model\.mm_projector\.", "mm_projector."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"language_model.\1."),
]
APPLE_INVERSE: list[tuple[str, str]] = [
    (r"^vision_tower\.", "model.vision_tower.vision_tower.model."),
    (r"^mm_projector\.", "model.mm_projector."),
    (r"^language_model\.", "model."),
]

HF_RULES: list[tuple[str, str]] = [
    (r"^model\.language_model\.", "language_model."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mm_projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mm_projector.2."),
    (r"^model\.vision_tower\.timm_model\.", "vision_tower."),
    (r"^vision_tower\.stages\.(\d+)\.(downsample|pos_emb|blocks)\.", "<network>"),
    (r"^vision_tower\.stem\.", "vision_tower.patch_embed."),
    (r"^vision_tower\.final_conv\.", "vision_tower.conv_exp."),
    (r"^(vision_tower\.conv_exp\.se)\.fc1\.", r"\1.reduce."),
    (r"^(vision_tower\.conv_exp\.se)\.fc2\.", r"\1.expand."),
    (r"^(vision_tower\.network\.\d+\.\d+)\.mlp\.", r"\1.convffn."),
    (r"^(vision_tower\.network\.\d+\.\d+\.layer_scale(_1|_2)?)\.gamma$", r"\1"),
    (r"^(vision_tower\.network\.\d+\.proj\.0)\.reparam_conv\.", r"\1.lkb_reparam."),
]
HF_INVERSE: list[tuple[str, str]] = [
    (r"^language_model\.", "model.language_model."),
    (r"^mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^vision_tower\.patch_embed\.", "vision_tower.stem."),
    (r"^vision_tower\.conv_exp\.se\.reduce\.", "vision_tower.conv_exp.se.fc1."),
    (r"^vision_tower\.conv_exp\.se\.expand\.", "vision_tower.conv_exp.se.fc2."),
    (r"^vision_tower\.conv_exp\.", "vision_tower.final_conv."),
    (r"^(vision_tower\.network\.\d+\.\d+)\.convffn\.", r"\1.mlp."),
    (r"^(vision_tower\.network\.\d+\.\d+\.layer_scale(_1|_2)?)$", r"\1.gamma"),
    (r"^(vision_tower\.network\.\d+\.proj\.0)\.lkb_reparam\.", r"\1.reparam_conv."),
    (r"^vision_tower\.network\.(\d+)\.", "<stage>"),
    (r"^vision_tower\.", "model.vision_tower.timm_model."),
]


def network_index(vc: VisionConfig) -> dict[tuple[str, int], int]:
    """timm (part, stage) → Apple flat `network` index, mirroring FastViTHD.__init__."""
    out, n = {}, 0
    for s in range(len(vc.layers)):
        parts = (["downsample"] if s > 0 else []) + (["pos_emb"] if vc.pos_embs[s] else [])
        for part in [*parts, "blocks"]:
            out[(part, s)] = n
            n += 1
    return out


def _apply(rules: list[tuple[str, str]], key: str, callback=None) -> str:
    """Apply ordered regex rewrites; "<...>" replacements are delegated to `callback`."""
    for pat, rep in rules:
        key = re.sub(pat, callback if rep.startswith("<") else rep, key)
    return key


class KeyMap:
    """Bidirectional key renaming for one checkpoint format and vision config."""

    def __init__(self, fmt: str, vc: VisionConfig) -> None:
        if fmt not in ("apple", "hf", "fastvlm", "mlx"):
            raise ValueError(f"unknown format {fmt!r}")
        self.fmt = fmt
        self.net = network_index(vc)  # (part, stage) -> flat index
        self.rev = {v: k for k, v in self.net.items()}

    def to_internal(self, key: str) -> str | None:
        """Format key → internal key, or None for known junk to drop."""
        if self.fmt == "apple":
            key = _apply(APPLE_RULES, key)
        elif self.fmt == "hf":
            key = _apply(HF_RULES, key, self._stage)
        elif self.fmt == "mlx":
            key = _apply(MLX_RULES, key)
        if any(p.search(key) for p in JUNK):
            return None
        return key

    def from_internal(self, key: str) -> str:
        if self.fmt == "apple":
            return _apply(APPLE_INVERSE, key)
        if self.fmt == "hf":
            return _apply(HF_INVERSE, key, self._network)
        if self.fmt == "mlx":
            return _apply(MLX_INVERSE, key)
        return key

    def _stage(self, m: re.Match) -> str:
        part, s = m.group(2), int(m.group(1))
        if (part, s) not in self.net:
            raise CheckpointError(f"checkpoint has stages.{s}.{part}, which the config lacks")
        return f"vision_tower.network.{self.net[(part, s)]}."

    def _network(self, m: re.Match) -> str:
        part, s = self.rev[int(m.group(1))]
        return f"vision_tower.stages.{s}.{part}."


# ---------------------------------------------------------------------- config
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def detect_format(config: dict, keys: list[str] | None = None) -> str:
    mt = config.get("model_type", "")
    if mt == "fast_vlm" or (
        keys and any(k.startswith("model.vision_tower.timm_model.") for k in keys)
    ):
        return "hf"
    if mt in ("llava_qwen2", "llava_qwen") or (
        keys and any(k.startswith("model.vision_tower.vision_tower.") for k in keys)
    ):
        return "apple"
    if mt == "fastvlm":
        return "fastvlm"
    raise ConfigError(
        f"config.json model_type {mt!r} is not a FastVLM checkpoint "
        "(expected 'llava_qwen2', 'fast_vlm' or 'fastvlm')"
    )


def load_config(folder: Path, image_size: int | None = None) -> FastVLMConfig:
    path = folder / "config.json"
    if not path.exists():
        raise ConfigError(f"{folder} has no config.json: is this a FastVLM model folder?")
    d = read_json(path)
    fmt = detect_format(d)
    if fmt == "apple":
        cfg = from_apple_dict(d)
    elif fmt == "hf":
        pre = folder / "preprocessor_config.json"
        cfg = from_hf_dict(d, read_json(pre) if pre.exists() else None)
    else:
        cfg = FastVLMConfig.from_dict(d)
    if image_size is not None:  # 0 or a negative size is an error (validate), not "default"
        cfg.vision.image_size = int(image_size)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------- tensors
def weight_files(folder: Path, trust_pickle: bool = False) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
        paths = [folder / f for f in files]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise CheckpointError(f"sharded checkpoint is incomplete, missing: {missing}")
        return paths
    # Training leaves optimizer state and adapters beside the weights: never load those as weights.
    st = sorted(
        f for f in folder.glob("*.safetensors") if not f.name.startswith(("optimizer", "adapter"))
    )
    if st:
        return st
    pickles = sorted([*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    if pickles and not trust_pickle:
        raise CheckpointError(
            f"{folder} only has pickle weights ({pickles[0].name}); pickle can run arbitrary code. "
            "Convert them to safetensors, or pass trust_pickle=True (CLI: --trust-pickle) if you "
            "trust the source."
        )
    if pickles:
        return pickles
    if (folder / "fastvlm_export.json").exists():  # its weights live inside the ONNX graphs
        raise CheckpointError(
            f"{folder} is an ONNX export, not a PyTorch checkpoint: run it with --backend "
            "onnxruntime (or auto); quantize, train, convert or export the checkpoint it came from"
        )
    raise CheckpointError(f"{folder} has no weights (*.safetensors)")


def load_model(
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_pickle: bool = False,
    image_size: int | None = None,
    config: FastVLMConfig | None = None,
    quant: str | dict[str, Any] | None = None,
    repack: bool = True,
):
    """Build a FastVLMModel from a checkpoint folder: meta init, strict key check, assign.

    `quant` (a `fastvlm.quant` spec: "int8", "int4", "llm=int4-g64,projector=int8", ...) loads a
    float checkpoint straight into quantized Linears, tensor by tensor and a few thousand rows at
    a time (`quant/stream.py`): the float weights of those layers are never all in memory.
    The result equals loading in float then `quantize_model(model, quant)`; its per-component
    sizes are in `model.quant_summary`. `repack=False` keeps the portable quantized form (for
    saving)."""
    folder = Path(folder)
    cfg = config or load_config(folder, image_size)
    files = weight_files(folder, trust_pickle)
    shapes = peek_keys_and_shapes(files)
    keymap, entries = _source(folder, files, shapes, cfg)
    # The embedding row count is the checkpoint's (vocab rows are padded differently per format).
    for k, shape in shapes.items():
        if keymap.to_internal(k) == "language_model.embed_tokens.weight":
            cfg.text.vocab_size = shape[0]
    with torch.device("meta"):
        model = FastVLMModel(cfg)
    stored_tied = cfg.text.tie_word_embeddings
    plan = None
    if normalize_quant(quant) is not None:  # quantize while reading (never the float model)
        plan = plan_streamed(model, quant)
    elif cfg.quantization:  # swap in empty quantized Linears so the key sets match
        prepare_for_load(model, cfg.quantization)
    expected = dict(model.state_dict())
    tied = cfg.text.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    unexpected, stored_head, numel_by_dtype = [], None, Counter()
    for k, shape, read in entries:
        ik = keymap.to_internal(k)
        if ik is None:
            continue
        if plan is not None:
            if stored_tied and ik == "lm_head.weight":
                continue  # a tied head is quantized from the embedding (reference behaviour)
            head = plan.head_from_embedding and ik == "language_model.embed_tokens.weight"
            if plan.wants(ik) or head:
                if not head:  # the embedding itself is counted below, read as float
                    numel_by_dtype[_stored_dtype(read)] += math.prod(shape)
                state.update(plan.quantize("lm_head.weight" if head else ik, shape, read,
                                           dtype, device))  # fmt: skip
                if not head:
                    continue
        t, stored = _read_converted(read, shape, dtype)
        numel_by_dtype[stored] += t.numel()
        if tied and ik == "lm_head.weight":
            stored_head = t
            continue
        if ik not in expected:
            unexpected.append(k)
            continue
        if tuple(t.shape) != tuple(expected[ik].shape):
            raise CheckpointError(
                f"{k}: checkpoint shape {tuple(t.shape)} != model shape "
                f"{tuple(expected[ik].shape)} (config.json does not match the weights)"
            )
        state[ik] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the {cfg.format!r} FastVLM layout: "
            f"{len(missing)} missing keys {_short(missing)}, "
            f"{len(unexpected)} unexpected keys {_short(unexpected)}"
        )
    if stored_head is not None:
        emb = state["language_model.embed_tokens.weight"]
        if stored_head.shape != emb.shape or not torch.equal(stored_head.to(emb), emb):
            warnings.warn(
                "tie_word_embeddings is set but the stored lm_head.weight differs from the "
                "embedding; using the embedding (Apple's reference behaviour)",
                stacklevel=2,
            )
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=torch.long, device=device)
    if tied:
        state["lm_head.weight"] = state["language_model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.source_dtype = dominant_dtype(numel_by_dtype)  # what `--save-dtype auto` writes
    if plan is not None:
        model.quant_summary = plan.summary
    if cfg.quantization and repack:  # repack the portable int8/int4 tensors for the kernel
        finalize(model)
    return model.eval()


def _source(folder: Path, files: list[Path], keys, cfg: FastVLMConfig):
    """(KeyMap, (key, shape, read) entries) for a folder: MLX-layout folders (mlx-vlm
    conversions, `llava_qwen2` config) are dequantized and transposed to torch layout by
    mlx_format; everything else is read lazily, row ranges at a time (`iter_entries`)."""
    check_not_app_bundle(folder, keys)
    if is_mlx_layout(keys):
        tensors = iter_mlx_tensors(files, read_json(folder / "config.json"))
        entries = ((k, tuple(t.shape), rows_of(t)) for k, t in tensors)
        return KeyMap("mlx", cfg.vision), entries
    return KeyMap(cfg.format, cfg.vision), iter_entries(files)


def _read_converted(read, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.dtype]:
    """(tensor, stored dtype), floats converted to `dtype` row chunk by row chunk: the stored
    copy (e.g. bf16) and the converted one are never both whole, and every read buffer is at
    most one chunk, so the freed buffers are reused instead of leaving heap holes."""
    if len(shape) < 1:
        t = read()
        return t, t.dtype
    src = _stored_dtype(read)
    if not src.is_floating_point or src == dtype:
        return read(), src
    out = torch.empty(shape, dtype=dtype)
    step = max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))
    for r0 in range(0, shape[0], step):
        out[r0 : r0 + step] = read(r0, min(shape[0], r0 + step))
    return out, src


def _stored_dtype(read) -> torch.dtype:
    return read(0, 1).dtype


def _short(keys: list[str], n: int = 5) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


# ---------------------------------------------------------------------- saving
def save_checkpoint(
    state: dict[str, torch.Tensor],
    cfg: FastVLMConfig,
    folder: Path,
    fmt: str = "fastvlm",
    dtype: torch.dtype | None = None,
) -> None:
    """Write internal-named tensors + config in `fmt` to `folder` (tied lm_head not stored);
    `dtype` casts the float tensors (integer / quantized ones are kept as they are)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keymap = KeyMap(fmt, cfg.vision)
    out = {}
    for k, t in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[keymap.from_internal(k)] = t.contiguous().cpu()
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_format(cfg, fmt), indent=2) + "\n")
    if fmt == "hf":
        (folder / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config(cfg), indent=2) + "\n"
        )
        proc = {
            "image_token": "<image>",
            "num_additional_image_tokens": 0,
            "patch_size": cfg.vision.patch_size,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": "full",
        }
        (folder / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "README.md",
    "LICENSE",
)


def convert_checkpoint(
    src: Path, dst: Path, fmt: str, *, trust_pickle: bool = False, q_bits: int | None = None
) -> Path:
    """Rewrite a checkpoint folder in another format, tensors bit-for-bit (no dtype change);
    `fmt="mlx"` with `q_bits` also affine-quantizes the decoder (see mlx_format.py)."""
    src, dst = Path(src), Path(dst)
    if fmt not in ("apple", "hf", "fastvlm", "mlx"):
        raise ValueError(f"--to must be apple, hf, fastvlm or mlx, not {fmt!r}")
    if q_bits is not None and fmt != "mlx":
        raise ConfigError("--q-bits applies to --to mlx only (use `fastvlm quantize` otherwise)")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    cfg = load_config(src)
    if cfg.quantization and fmt == "mlx":
        raise ConfigError(
            "this folder is quantized with fastvlm's int8/int4 scheme: convert the float "
            "checkpoint to MLX (add --q-bits 4|8 for MLX quantization)"
        )
    files = weight_files(src, trust_pickle)
    keymap, entries = _source(src, files, peek_keys_and_shapes(files), cfg)
    state: dict[str, torch.Tensor] = {}
    for k, _shape, read in entries:
        ik = keymap.to_internal(k)
        if ik is not None:
            state[ik] = read()
    cfg.text.vocab_size = state["language_model.embed_tokens.weight"].shape[0]
    with torch.device("meta"):
        expected = set(FastVLMModel(cfg).state_dict())
    if cfg.text.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    expected = {k for k in expected if not k.endswith("num_batches_tracked")}
    got = {k for k in state if not k.endswith("num_batches_tracked")}
    if got != expected:
        raise CheckpointError(
            f"{src} does not match the FastVLM layout: missing {_short(sorted(expected - got))}, "
            f"unexpected {_short(sorted(got - expected))}"
        )
    if fmt == "mlx":
        save_mlx(state, cfg, dst, q_bits=q_bits)
    else:
        save_checkpoint(state, cfg, dst, fmt)
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst
