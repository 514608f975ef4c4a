"""The tiny transformers FastVLM of the fixtures: config, re-randomised weights, vision scale
calibration, and the explicit inverse of the HF conversion rules (Apple `llava_qwen2` keys and
config)."""

from __future__ import annotations

import re

import numpy as np
import torch
from fixture_common import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    MAX_POS,
    NUM_IMAGE_TOKENS,
    RMS_EPS,
    ROPE_THETA,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
    VISION_EMBED_DIMS,
    VISION_HIDDEN,
    VISION_LAYERS,
    VISION_MLP_RATIOS,
    VOCAB_SIZE,
)


# ----------------------------------------------------------------------------------------------
# Model construction and randomisation
# ----------------------------------------------------------------------------------------------
def build_tiny_config():
    from transformers import FastVlmConfig, Qwen2Config, TimmWrapperConfig

    vision_config = TimmWrapperConfig(
        architecture="fastvit_mci3",
        model_args={
            "inference_mode": True,
            "layers": list(VISION_LAYERS),
            "embed_dims": list(VISION_EMBED_DIMS),
            "mlp_ratios": list(VISION_MLP_RATIOS),
        },
        hidden_size=VISION_HIDDEN,
        do_pooling=True,
        global_pool="avg",
        initializer_range=0.02,
    )
    vision_config.label2id = {}  # as the HF convert script does (no classifier labels)
    vision_config.id2label = {}
    text_config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_POS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=RMS_EPS,
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=TEXT_LAYERS,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )
    config = FastVlmConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    return config


def randomize_(
    model: torch.nn.Module,
    seed: int,
    embed_std: float = 0.5,
    out_gain: float = 8.0,
    qk_gain: float = 1.0,
) -> dict:
    """Overwrite EVERY floating-point parameter and persistent buffer with seeded random values.

    Rules (HF/timm key names; applied in sorted key order with one torch.Generator):

    * BatchNorm (ConvMlp ``mlp.conv.bn``): weight ~ U(0.5, 1.5), bias ~ N(0, 0.1),
      running_mean ~ N(0, 0.1), running_var ~ U(0.5, 1.5) (``num_batches_tracked`` is an int
      counter, unused in eval mode, left as is).
    * Layer scales (``*.gamma``: RepMixerBlock ``layer_scale``, AttentionBlock
      ``layer_scale_{1,2}``): N(0, 0.5) instead of the 1e-5 init, so the residual branches matter.
    * Depthwise convs that have the identity folded in (RepMixer ``token_mixer.reparam_conv``,
      RepCPE ``pos_emb.reparam_conv``): centre-tap identity + N(0, 0.5 / k), like real fused
      weights.
    * Every other conv / linear weight: N(0, 1 / sqrt(fan_in)) (fan_in = in/groups * kh * kw).
    * 1-D ``weight`` of norms (channel LayerNorm, Qwen2 RMSNorm): U(0.5, 1.5).
    * Every bias: N(0, 0.1).
    * Token embedding (tied with lm_head): N(0, embed_std).
    * Qwen2 residual-branch output projections (``o_proj``, ``down_proj``):
      N(0, out_gain / sqrt(fan_in)).
      With tied embeddings and weak branches, a random decoder just copies its last input token
      (h_final ~ e_t maximises e_t . h); stronger branches give a varied greedy sequence.
    * Qwen2 ``q_proj`` / ``k_proj`` weights: N(0, qk_gain / sqrt(fan_in)).  A deep random decoder
      with near-uniform attention collapses to one hidden state for every position (greedy
      decoding then repeats one token); sharper attention (qk_gain 2 for 24 layers) avoids it.

    The vision tower and projector are then rescaled by `calibrate_vision_`.
    """
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    touched = {}
    tied_skip = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo

    for name in sorted(sd):
        t = sd[name]
        if not t.is_floating_point():
            continue
        if name in tied_skip:
            continue
        shape = tuple(t.shape)
        if name.endswith("running_mean"):
            new, rule = normal(shape, 0.1), "bn.running_mean N(0,0.1)"
        elif name.endswith("running_var"):
            new, rule = uniform(shape, 0.5, 1.5), "bn.running_var U(0.5,1.5)"
        elif ".bn." in name and name.endswith(".weight"):
            new, rule = uniform(shape, 0.5, 1.5), "bn.weight U(0.5,1.5)"
        elif name.endswith(".gamma"):
            new, rule = normal(shape, 0.5), "layer_scale N(0,0.5)"
        elif name.endswith("embed_tokens.weight"):
            new, rule = normal(shape, embed_std), f"embed N(0,{embed_std})"
        elif name.endswith(".bias"):
            new, rule = normal(shape, 0.1), "bias N(0,0.1)"
        elif len(shape) == 4 and (
            ".token_mixer.reparam_conv." in name or ".pos_emb.reparam_conv." in name
        ):
            k = shape[-1]
            new = normal(shape, 0.5 / k)
            new[:, 0, k // 2, k // 2] += 1.0
            rule = "dw conv with folded identity: delta + N(0,0.5/k)"
        elif len(shape) == 2 and (
            name.endswith(".o_proj.weight") or name.endswith(".down_proj.weight")
        ):
            fan_in = shape[1]
            new, rule = (
                normal(shape, out_gain / fan_in**0.5),
                f"weight N(0,{out_gain}/sqrt(fan_in))",
            )
        elif len(shape) == 2 and (
            name.endswith(".q_proj.weight") or name.endswith(".k_proj.weight")
        ):
            fan_in = shape[1]
            new, rule = normal(shape, qk_gain / fan_in**0.5), f"weight N(0,{qk_gain}/sqrt(fan_in))"
        elif len(shape) in (2, 4):
            fan_in = int(np.prod(shape[1:]))
            new, rule = normal(shape, 1.0 / fan_in**0.5), "weight N(0,1/sqrt(fan_in))"
        elif len(shape) == 1 and name.endswith(".weight"):
            new, rule = uniform(shape, 0.5, 1.5), "norm.weight U(0.5,1.5)"
        else:
            raise RuntimeError(f"no randomisation rule for {name} {shape}")
        with torch.no_grad():
            t.copy_(new.to(t.dtype))
        touched[name] = rule
    # every floating tensor of the state dict was touched (tied lm_head follows the embedding)
    missing = [
        n
        for n, t in sd.items()
        if t.is_floating_point() and n not in touched and n not in tied_skip
    ]
    assert not missing, missing
    if tied_skip:
        assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    return touched


def calibrate_vision_(
    model, pixel_values: torch.Tensor, target: float = 1.0, proj_target: float | None = None
) -> list:
    """LSUV-style scale calibration of the vision tower + projector (after `randomize_`).

    Plain N(0, 1/sqrt(fan_in)) weights make a deep GELU/BN/layer-scale conv stack either vanish
    or explode.  So every Conv2d / Linear of the vision tower and projector is rescaled (weight
    and bias by the same factor) so that its own output has std `target` on the calibration
    image.  This is done in ONE forward pass: a forward hook on each module, called in forward
    order, measures the output std, rescales the module's parameters and returns the rescaled
    output, so later modules are calibrated on already-calibrated inputs.  The depthwise convs
    with the identity folded in (RepMixer ``token_mixer.reparam_conv``, RepCPE
    ``pos_emb.reparam_conv``) are left as they are.  Deterministic (fixed weights + image).
    `proj_target` (default `target`) sets the std of the projected image features (the output of
    ``linear_2``), i.e. their scale relative to the token embeddings: if the 256 image rows are
    much larger than the text rows they dominate every hidden state and greedy decoding collapses
    to one token.
    """
    modules = {}
    for prefix, root in (
        ("model.vision_tower.", model.model.vision_tower),
        ("model.multi_modal_projector.", model.model.multi_modal_projector),
    ):
        for n, m in root.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                if ".token_mixer.reparam_conv" in "." + n or ".pos_emb.reparam_conv" in "." + n:
                    continue
                modules[prefix + n] = m
    factors = []

    def make_hook(name):
        def hook(mod, inp, out):
            t = (
                proj_target
                if (proj_target is not None and name.endswith("multi_modal_projector.linear_2"))
                else target
            )
            f = t / float(out.float().std())
            mod.weight.mul_(f)
            if mod.bias is not None:
                mod.bias.mul_(f)
            factors.append((name, f))
            return out * f

        return hook

    hooks = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixel_values)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(n for n, _ in factors) == sorted(modules), "each module must run exactly once"
    return factors


# ----------------------------------------------------------------------------------------------
# HF <-> Apple key conversion
# ----------------------------------------------------------------------------------------------
# Explicit inverse of transformers' convert_fastvlm_weights_to_hf.py rules (reference section 4.3).
# Apple's FastViT keeps every stage element in one flat ``network`` list:
#   network = [stage0 blocks, PatchEmbed->1, stage1 blocks, PatchEmbed->2, stage2 blocks,
#              PatchEmbed->3, RepCPE 3, stage3 blocks, PatchEmbed->4, RepCPE 4, stage4 blocks]
# which fixes these indices independently of the per-stage depths:
HF_STAGE_BLOCKS_TO_APPLE_NETWORK = {
    0: 0,
    1: 2,
    2: 4,
    3: 7,
    4: 10,
}  # stages.S.blocks.B -> network.N.B
HF_STAGE_DOWNSAMPLE_TO_APPLE_NETWORK = {
    1: 1,
    2: 3,
    3: 5,
    4: 8,
}  # stages.S.downsample.proj -> network.N.proj
HF_STAGE_POS_EMB_TO_APPLE_NETWORK = {
    3: 6,
    4: 9,
}  # stages.S.pos_emb.reparam_conv -> network.N.reparam_conv

HF_VISION_PREFIX = "model.vision_tower.timm_model."
APPLE_VISION_PREFIX = "model.vision_tower.vision_tower.model."

# Inverse table, HF suffix pattern -> Apple suffix (applied to the part after the prefixes):
#   stem.{i}.reparam_conv.*                      -> patch_embed.{i}.reparam_conv.*
#   stages.S.downsample.proj.0.reparam_conv.*    -> network.D(S).proj.0.lkb_reparam.*
#   stages.S.downsample.proj.1.reparam_conv.*    -> network.D(S).proj.1.reparam_conv.*
#   stages.S.pos_emb.reparam_conv.*              -> network.P(S).reparam_conv.*
#   stages.S.blocks.B.<block suffix>             -> network.K(S).B.<apple block suffix>
#       block suffix: mlp. -> convffn.; layer_scale.gamma -> layer_scale;
#                     layer_scale_1.gamma -> layer_scale_1; layer_scale_2.gamma -> layer_scale_2;
#                     token_mixer.*, norm.* unchanged
#   final_conv.reparam_conv.*                    -> conv_exp.reparam_conv.*
#   final_conv.se.fc1.* / final_conv.se.fc2.*    -> conv_exp.se.reduce.* / conv_exp.se.expand.*
# LLM + projector:
#   model.language_model.embed_tokens.weight     -> model.embed_tokens.weight
#   model.language_model.layers.{i}.*            -> model.layers.{i}.*
#   model.language_model.norm.weight             -> model.norm.weight
#   model.multi_modal_projector.linear_1.*       -> model.mm_projector.0.*
#   model.multi_modal_projector.linear_2.*       -> model.mm_projector.2.*
#   lm_head.weight                               -> lm_head.weight (written even when tied)
# Apple-only junk: model.vision_tower.vision_tower.model.head.proj (unused MobileCLIP projection).


def hf_key_to_apple(key: str) -> str:
    if key.startswith(HF_VISION_PREFIX):
        s = key[len(HF_VISION_PREFIX) :]
        m = re.fullmatch(r"stem\.(\d+)\.(.*)", s)
        if m:
            return f"{APPLE_VISION_PREFIX}patch_embed.{m.group(1)}.{m.group(2)}"
        m = re.fullmatch(r"stages\.(\d+)\.downsample\.proj\.0\.reparam_conv\.(.*)", s)
        if m:
            n = HF_STAGE_DOWNSAMPLE_TO_APPLE_NETWORK[int(m.group(1))]
            return f"{APPLE_VISION_PREFIX}network.{n}.proj.0.lkb_reparam.{m.group(2)}"
        m = re.fullmatch(r"stages\.(\d+)\.downsample\.proj\.1\.(.*)", s)
        if m:
            n = HF_STAGE_DOWNSAMPLE_TO_APPLE_NETWORK[int(m.group(1))]
            return f"{APPLE_VISION_PREFIX}network.{n}.proj.1.{m.group(2)}"
        m = re.fullmatch(r"stages\.(\d+)\.pos_emb\.reparam_conv\.(.*)", s)
        if m:
            n = HF_STAGE_POS_EMB_TO_APPLE_NETWORK[int(m.group(1))]
            return f"{APPLE_VISION_PREFIX}network.{n}.reparam_conv.{m.group(2)}"
        m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", s)
        if m:
            n = HF_STAGE_BLOCKS_TO_APPLE_NETWORK[int(m.group(1))]
            suffix = m.group(3)
            if suffix.startswith("mlp."):
                suffix = "convffn." + suffix[len("mlp.") :]
            elif suffix in ("layer_scale.gamma", "layer_scale_1.gamma", "layer_scale_2.gamma"):
                suffix = suffix[: -len(".gamma")]
            elif not (suffix.startswith("token_mixer.") or suffix.startswith("norm.")):
                raise KeyError(key)
            return f"{APPLE_VISION_PREFIX}network.{n}.{m.group(2)}.{suffix}"
        m = re.fullmatch(r"final_conv\.(.*)", s)
        if m:
            suffix = m.group(1).replace("se.fc1.", "se.reduce.").replace("se.fc2.", "se.expand.")
            return f"{APPLE_VISION_PREFIX}conv_exp.{suffix}"
        raise KeyError(key)
    for hf_prefix, apple_prefix in (
        ("model.language_model.embed_tokens.", "model.embed_tokens."),
        ("model.language_model.layers.", "model.layers."),
        ("model.language_model.norm.", "model.norm."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ):
        if key.startswith(hf_prefix):
            return apple_prefix + key[len(hf_prefix) :]
    if key == "lm_head.weight":
        return key
    raise KeyError(key)


def apple_key_to_hf_forward_rules(key: str) -> str | None:
    """The FORWARD (Apple -> HF) rules of transformers' convert_fastvlm_weights_to_hf.py,
    re-stated from reference section 4.3 and applied in the same order.  Returns None for the
    dropped key (``...head.proj``)."""
    if key == APPLE_VISION_PREFIX + "head.proj":  # rule 0
        return None
    if key.endswith("layer_scale"):  # rule 1
        key = key.replace("layer_scale", "layer_scale.gamma")
    if key.startswith("model.norm"):  # rule 2
        key = key.replace("model.norm", "model.language_model.norm")
    if "token_mixer" not in key:  # rule 3
        key = key.replace(".proj.", ".downsample.proj.")

    def stage_of(n: str) -> int:
        n = int(n)
        return {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 4}[n]

    found = re.findall(r"network\.(\d{1,2})\.(\d{1,2})", key)  # rule 4
    if len(found) == 1:
        a, b = found[0]
        key = key.replace(f"network.{a}.{b}", f"stages.{stage_of(a)}.blocks.{b}")
    found = re.findall(r"network\.(\d{1,2})", key)  # rule 5
    if len(found) == 1:
        a = found[0]
        key = key.replace(f"network.{a}", f"stages.{stage_of(a)}")
    found = re.findall(r"stages\.(\d{1,2})\.reparam_conv", key)  # rule 6
    if len(found) == 1:
        key = key.replace(f"stages.{found[0]}", f"stages.{found[0]}.pos_emb")
    for old, new in (  # rule 7, in this order
        ("model.vision_tower.vision_tower.model", "model.vision_tower.timm_model"),
        ("patch_embed", "stem"),
        ("layers", "language_model.layers"),
        ("embed_tokens", "language_model.embed_tokens"),
        ("layer_scale_1", "layer_scale_1.gamma"),
        ("layer_scale_2", "layer_scale_2.gamma"),
        ("mm_projector.0", "multi_modal_projector.linear_1"),
        ("mm_projector.2", "multi_modal_projector.linear_2"),
        ("conv_exp", "final_conv"),
        ("se.reduce", "se.fc1"),
        ("se.expand", "se.fc2"),
        ("convffn", "mlp"),
        ("lkb_reparam", "reparam_conv"),
    ):
        if old in key:
            key = key.replace(old, new)
    return key  # rule 8: lm_head.weight unchanged


def apple_config(hf_config) -> dict:
    t = hf_config.text_config
    return {
        "architectures": ["LlavaQwen2ForCausalLM"],
        "model_type": "llava_qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "image_token_index": hf_config.image_token_id,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "mm_hidden_size": hf_config.vision_config.hidden_size,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": f"mobileclip_l_{IMAGE_SIZE}",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": ROPE_THETA,
        "sliding_window": t.max_position_embeddings,
        "tie_word_embeddings": True,
        "tokenizer_model_max_length": 8192,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True,
        "use_cache": True,
        "use_mm_proj": True,
        "use_sliding_window": False,
        "vocab_size": t.vocab_size,
        # Extension (not in Apple's files; Apple's loader ignores unknown keys): the tiny tower is
        # not the standard FastViTHD, so its shape is recorded here.
        "vision_config": {
            "layers": list(VISION_LAYERS),
            "embed_dims": list(VISION_EMBED_DIMS),
            "mlp_ratios": list(VISION_MLP_RATIOS),
            "image_size": IMAGE_SIZE,
        },
    }
