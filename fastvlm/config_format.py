"""Our config → the config.json (and processor json) of each checkpoint format, for saving."""

from __future__ import annotations

from .config import FastVLMConfig


def config_to_format(cfg: FastVLMConfig, fmt: str) -> dict:
    """Our config → the config.json dict of `fmt` (keeps non-default vision dims readable)."""
    import dataclasses

    from .config import VisionConfig as _VC
    from .errors import ConfigError

    if fmt != "fastvlm" and cfg.projector_hidden_size != cfg.text.hidden_size:
        raise ConfigError(
            f"the {fmt!r} format has no projector width setting: this model's projector was "
            "pruned; keep it in the fastvlm format"
        )
    t = dataclasses.asdict(cfg.text)
    t.pop("attention_bias")
    t = {k: v for k, v in t.items() if v is not None}
    vdef = _VC()
    overrides = {
        f.name: list(getattr(cfg.vision, f.name))
        if isinstance(getattr(cfg.vision, f.name), tuple)
        else getattr(cfg.vision, f.name)
        for f in dataclasses.fields(_VC)
        if f.name not in ("image_size", "inference_mode")
        and getattr(cfg.vision, f.name) != getattr(vdef, f.name)
    }
    if fmt == "apple":
        d = {
            "model_type": "llava_qwen2",
            "architectures": ["LlavaQwen2ForCausalLM"],
            **t,
            "mm_hidden_size": cfg.vision.hidden_size,
            "mm_projector_type": cfg.mm_projector_type,
            "mm_vision_tower": f"mobileclip_l_{cfg.vision.image_size}",
            "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch",
            "mm_patch_merge_type": "flat",
            "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False,
            "image_aspect_ratio": "pad" if cfg.image_aspect_ratio == "pad" else "square",
            "tokenizer_model_max_length": 8192,
            "tokenizer_padding_side": "right",
            "image_token_index": cfg.image_token_id,
        }
        if overrides:
            d["vision_config"] = {**overrides, "image_size": cfg.vision.image_size}
        extras = _extras(cfg, chat_template="apple")
        return {**d, "fastvlm_extras": extras} if extras else d
    if fmt == "hf":
        extras = _extras(cfg, chat_template="hf", image_aspect_ratio="crop")
        return {
            **({"fastvlm_extras": extras} if extras else {}),
            "model_type": "fast_vlm",
            "architectures": ["FastVlmForConditionalGeneration"],
            "image_token_id": cfg.image_token_id,
            "image_seq_length": cfg.num_image_tokens,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full",
            "tie_word_embeddings": cfg.text.tie_word_embeddings,
            "text_config": {"model_type": "qwen2", **t},
            "vision_config": {
                "model_type": "timm_wrapper",
                "architecture": "fastvit_mci3",
                "hidden_size": cfg.vision.hidden_size,
                "do_pooling": True,
                "global_pool": "avg",
                "model_args": {"inference_mode": True, **overrides},
            },
        }
    return cfg.to_dict()


def _extras(cfg: FastVLMConfig, **format_defaults) -> dict:
    """Settings a format cannot express natively (kept under `fastvlm_extras` for round trips)."""
    from .config import DEFAULT_SYSTEM_PROMPT

    out = {k: getattr(cfg, k) for k, v in format_defaults.items() if getattr(cfg, k) != v}
    if cfg.system_prompt != DEFAULT_SYSTEM_PROMPT:
        out["system_prompt"] = cfg.system_prompt
    return out


def preprocessor_config(cfg: FastVLMConfig) -> dict:
    s = cfg.vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_resize": True,
        "size": {"shortest_edge": s},
        "do_center_crop": True,
        "crop_size": {"height": s, "width": s},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "do_convert_rgb": True,
    }
