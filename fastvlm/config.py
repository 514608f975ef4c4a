"""Model configuration: VisionConfig / TextConfig / FastVLMConfig.

Field names follow the Hugging Face config keys (Qwen2's for the text side, Apple's FastViT
constructor arguments for the vision side), so a config.json of any supported checkpoint format
maps onto these dataclasses with a handful of lines (see `from_hf_dict` / `from_apple_dict`).
The formats differ in *where* keys live, not in what they mean.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Apple's image-token sentinel in token ids (llava/constants.py); never reaches embed_tokens.
APPLE_IMAGE_SENTINEL = -200
# First free id after Qwen2's three specials: the `<image>` id in the transformers format, and the
# id our runtime uses for image placeholders of Apple checkpoints too.
QWEN2_IMAGE_TOKEN_ID = 151646
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Largest encoder resolution accepted (16x the pixels of the released 1024 px models): a typo
# such as 10240 fails at load instead of allocating activations no machine holds.
MAX_IMAGE_SIZE = 4096


@dataclass(slots=True)
class VisionConfig:
    """FastViTHD (MCi3) hyper-parameters; defaults are the released FastVLM tower."""

    layers: tuple[int, ...] = (2, 12, 24, 4, 2)
    embed_dims: tuple[int, ...] = (96, 192, 384, 768, 1536)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 4, 4)
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention", "attention")
    pos_embs: tuple[bool, ...] = (False, False, False, True, True)
    down_patch_size: int = 7
    down_stride: int = 2
    repmixer_kernel_size: int = 3
    cls_ratio: float = 2.0
    head_dim: int = 32
    layer_scale_init_value: float = 1e-5
    layer_norm_eps: float = 1e-5
    image_size: int = 1024
    inference_mode: bool = True  # fused (re-parameterised) graph, as every released checkpoint

    @property
    def hidden_size(self) -> int:
        """Channels of the final `conv_exp` feature map (3072 for the released tower)."""
        return int(self.embed_dims[-1] * self.cls_ratio)

    @property
    def patch_size(self) -> int:
        """Total stride: 4 from the stem, `down_stride` per PatchEmbed."""
        return 4 * self.down_stride ** (len(self.layers) - 1)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        n = len(self.layers)
        for name in ("embed_dims", "mlp_ratios", "token_mixers", "pos_embs"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"vision config: `{name}` needs {n} entries, one per stage")
        for d, mixer in zip(self.embed_dims, self.token_mixers, strict=True):
            if mixer not in ("repmixer", "attention"):
                raise ConfigError(f"vision config: unknown token mixer {mixer!r}")
            if mixer == "attention" and d % self.head_dim:
                raise ConfigError(f"vision config: attention width {d} not a multiple of 32")
        for a, b in zip(self.embed_dims, self.embed_dims[1:], strict=False):
            if b % a:
                raise ConfigError(
                    f"vision config: width {b} must be a multiple of {a} (grouped conv)"
                )
        if not 0 < self.image_size <= MAX_IMAGE_SIZE or self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not valid: use a multiple of the encoder "
                f"stride {self.patch_size} from {self.patch_size} to {MAX_IMAGE_SIZE} "
                "(e.g. 512, 768, 1024)"
            )


@dataclass(slots=True)
class TextConfig:
    """Qwen2 decoder; defaults are transformers' `Qwen2Config` defaults (used for absent keys)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2: bias on q/k/v (never on o_proj)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("text config: num_attention_heads must be a multiple of kv heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"text config: unsupported hidden_act {self.hidden_act!r}")


@dataclass(slots=True)
class FastVLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mm_projector_type: str = "mlp2x_gelu"
    image_token_id: int = QWEN2_IMAGE_TOKEN_ID
    # How images are framed: "pad" (Apple: pad to square with black) or "crop" (transformers:
    # shortest-edge resize + centre crop).
    image_aspect_ratio: str = "pad"
    image_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Chat template flavour: "apple" (conv_qwen_2) or "hf" (transformers' FastVLM template).
    chat_template: str = "apple"
    # Checkpoint format this config was read from: "apple" | "hf" | "fastvlm".
    format: str = "fastvlm"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Weight-only quantization of the checkpoint (fastvlm/quant/), e.g. {"version": 1,
    # "llm": "int4-g128", "projector": "int8", "vision": "none"}; None for float weights.
    quantization: dict | None = None

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        if self.mm_projector_type != "mlp2x_gelu":
            raise ConfigError(f"unsupported mm_projector_type {self.mm_projector_type!r}")
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise ConfigError("image_aspect_ratio must be 'pad' or 'crop'")
        if self.chat_template not in ("apple", "hf"):
            raise ConfigError("chat_template must be 'apple' or 'hf'")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Our own config.json (model_type 'fastvlm')."""
        d = dataclasses.asdict(self)
        d.pop("format")
        if d["quantization"] is None:
            d.pop("quantization")
        return {"model_type": "fastvlm", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FastVLMConfig:
        d = dict(d)
        d.pop("model_type", None)
        vision = _make(VisionConfig, d.pop("vision", {}))
        text = _make(TextConfig, d.pop("text", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        cfg = cls(vision=vision, text=text, **extra)
        cfg.format = "fastvlm"
        return cfg


def _make(klass, d: dict[str, Any]):
    """Build a dataclass from a dict, ignoring unknown keys and turning lists into tuples."""
    names = {f.name for f in dataclasses.fields(klass)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    try:
        return klass(**kw)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"bad {klass.__name__}: {e}") from e


def text_config_from_qwen2(d: dict[str, Any]) -> TextConfig:
    """A Qwen2 config dict (flat) → TextConfig. Handles transformers 5's `rope_parameters`."""
    d = dict(d)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in (
        "default",
        None,
    ):
        raise ConfigError(f"unsupported RoPE scaling {rope!r}")
    return _make(TextConfig, d)


def vision_config_from_overrides(d: dict[str, Any], image_size: int) -> VisionConfig:
    v = _make(VisionConfig, {k: d[k] for k in d if k != "image_size"})
    v.image_size = int(d.get("image_size", image_size))
    return v


def from_apple_dict(d: dict[str, Any], image_size: int | None = None) -> FastVLMConfig:
    """Apple `llava_qwen2` config.json → FastVLMConfig."""
    tower = str(d.get("mm_vision_tower", "mobileclip_l_1024"))
    m = re.search(r"_(\d+)$", tower)
    if not tower.startswith("mobileclip") or m is None:
        raise ConfigError(f"unsupported vision tower {tower!r} (expected mobileclip_l_<size>)")
    size = image_size or int(m.group(1))
    vision = vision_config_from_overrides(d.get("vision_config") or {}, size)
    text = text_config_from_qwen2(d)
    if int(d.get("mm_hidden_size", vision.hidden_size)) != vision.hidden_size:
        raise ConfigError(
            f"mm_hidden_size {d.get('mm_hidden_size')} != vision width {vision.hidden_size}"
        )
    if d.get("mm_use_im_start_end") or d.get("mm_use_im_patch_token", False):
        raise ConfigError("mm_use_im_start_end / mm_use_im_patch_token are not supported")
    if d.get("mm_patch_merge_type", "flat") != "flat":
        raise ConfigError(f"mm_patch_merge_type {d['mm_patch_merge_type']!r} is not supported")
    aspect = d.get("image_aspect_ratio", "pad")
    cfg = FastVLMConfig(
        vision=vision,
        text=text,
        mm_projector_type=d.get("mm_projector_type", "mlp2x_gelu"),
        image_token_id=int(d.get("image_token_index", QWEN2_IMAGE_TOKEN_ID)),
        image_aspect_ratio="pad" if aspect == "pad" else "crop",
        chat_template="apple",
        format="apple",
    )
    return _with_extras(cfg, d)


def from_hf_dict(d: dict[str, Any], preprocessor: dict[str, Any] | None) -> FastVLMConfig:
    """transformers `fast_vlm` config.json (+ preprocessor_config.json) → FastVLMConfig."""
    vc = d.get("vision_config") or {}
    arch = vc.get("architecture", "fastvit_mci3")
    if arch != "fastvit_mci3":
        raise ConfigError(f"unsupported vision architecture {arch!r} (expected fastvit_mci3)")
    size = 1024
    if preprocessor:
        crop = preprocessor.get("crop_size") or preprocessor.get("size") or {}
        if isinstance(crop, dict):
            size = int(crop.get("height") or crop.get("shortest_edge") or size)
        elif isinstance(crop, int):
            size = crop
    vision = vision_config_from_overrides(vc.get("model_args") or {}, size)
    if int(vc.get("hidden_size", vision.hidden_size)) != vision.hidden_size:
        raise ConfigError("vision_config.hidden_size does not match the FastViT widths")
    tc = d.get("text_config") or {}
    text = text_config_from_qwen2(tc)
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in tc:
        text.tie_word_embeddings = bool(d["tie_word_embeddings"])
    if d.get("projector_hidden_act", "gelu") != "gelu":
        raise ConfigError(f"unsupported projector_hidden_act {d['projector_hidden_act']!r}")
    if d.get("multimodal_projector_bias", True) is not True:
        raise ConfigError("multimodal_projector_bias=False is not supported")
    mean = tuple((preprocessor or {}).get("image_mean", (0.0, 0.0, 0.0)))
    std = tuple((preprocessor or {}).get("image_std", (1.0, 1.0, 1.0)))
    image_token = d.get("image_token_id", d.get("image_token_index", QWEN2_IMAGE_TOKEN_ID))
    cfg = FastVLMConfig(
        vision=vision,
        text=text,
        image_token_id=int(image_token),
        image_aspect_ratio="crop",
        image_mean=mean,  # type: ignore[arg-type]
        image_std=std,  # type: ignore[arg-type]
        chat_template="hf",
        format="hf",
    )
    return _with_extras(cfg, d)


def _with_extras(cfg: FastVLMConfig, d: dict[str, Any]) -> FastVLMConfig:
    """Apply `fastvlm_extras` (settings a format cannot express, written by our converter)."""
    for k, v in (d.get("fastvlm_extras") or {}).items():
        if k in ("image_aspect_ratio", "chat_template", "system_prompt"):
            setattr(cfg, k, v)
    return cfg


# ---------------------------------------------------------------------- model shapes
# The released decoder shapes (FASTVLM_REFERENCE §3) with the converted checkpoints' vocabulary
# rows (the Apple rows + `<image>`, padded to a multiple of 64); "tiny" runs tests in seconds.
# Every tool that builds a random-weight model of a real size takes its shape from here.
_QWEN2 = dict(rope_theta=1e6, max_position_embeddings=32768)
TEXT_SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(
        vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, **_QWEN2,
    ),
    "1.5b": dict(
        vocab_size=152000, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, **_QWEN2,
    ),
    "7b": dict(
        vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, **_QWEN2,
    ),
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=1e6, max_position_embeddings=2048,
    ),
}  # fmt: skip
# Rows of the original Apple checkpoints (before `<image>` and the padding): 0.5B / 1.5B / 7B.
APPLE_VOCAB_ROWS = {"0.5b": 151936, "1.5b": 151936, "7b": 152064}
# The vision tower of "tiny": every stage one block, narrow (FastViTHD's released tower otherwise).
TINY_VISION: dict[str, Any] = dict(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128))


def shape(
    name: str,
    image_size: int = 1024,
    *,
    vision: dict[str, Any] | None = None,
    chat_template: str = "hf",
    **text: Any,
) -> FastVLMConfig:
    """The FastVLMConfig of a named shape ("0.5b", "1.5b", "7b", "tiny") at `image_size`.
    `text` overrides TextConfig fields (e.g. `vocab_size=APPLE_VOCAB_ROWS["0.5b"]`), `vision`
    VisionConfig fields (e.g. `vision=TINY_VISION` for a real decoder behind a toy tower)."""
    if name not in TEXT_SHAPES:
        raise ValueError(f"unknown shape {name!r}: choose from {sorted(TEXT_SHAPES)}")
    t = {**TEXT_SHAPES[name], **text}
    tiny = name == "tiny"
    v = TINY_VISION if tiny and vision is None else vision or {}
    return FastVLMConfig(
        vision=VisionConfig(image_size=image_size, **v),
        text=TextConfig(**t),
        image_token_id=t["vocab_size"] - 1 if tiny else QWEN2_IMAGE_TOKEN_ID,
        image_aspect_ratio="pad",
        chat_template=chat_template,
    )
