"""FastVLM re-authored with litert-torch's generative layers, cut into the three LiteRT-LM graphs.

* decoder  (`PREFILL_DECODE`): signatures `prefill_<T>` and `decode`; inputs `embeddings`
  (1, T, D), `input_pos` (T,), `mask` (1, 1, T, cache) float additive, `kv_cache_k_<i>` /
  `kv_cache_v_<i>`; outputs the updated caches (+ `logits` (1, 1, V) on decode).
* embedder (`EMBEDDER`): `decode_embedder` / `prefill_embedder_<T>`, `token_ids` → `embeddings`.
* vision   (`VISION_ENCODER`): `images` (1, S, S, 3) float in [0, 1] (what LiteRT-LM's image
  preprocessor hands over) → `features` (1, tokens, D), projector included, no adapter.

Design decisions:
* The decoder is litert-torch's `DecoderOnlyModel` (its attention, RoPE and KV-cache update ops
  are the ones LiteRT-LM's XNNPACK path is tuned for) built from our TextConfig; our parameter
  names are transformers' Qwen2 names, so its stock TENSOR_NAMES loader maps them.
* KV cache in the transposed layout (K: B,N,T,H; V: B,N,H,T), litert-torch's HF exporter's
  default: a decoder without a mask input gets its context length read from K's dim 2 by
  LiteRT-LM (B,T,N,H makes it read num_kv_heads); with the mask input both layouts run.
* Embeddings come from outside the decoder so image rows can be spliced in before prefill:
  that is how LiteRT-LM feeds vision features to a model without per-model glue.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

CAUSAL_MASK_VALUE = float("-inf")


def decoder_config(text, kv_len: int):
    """litert-torch ModelConfig for our Qwen2 TextConfig (raises ConfigError on unsupported)."""
    import litert_torch.generative.layers.model_config as cfg

    if text.hidden_act != "silu":
        raise ConfigError(f"LiteRT-LM export supports silu MLPs only, got {text.hidden_act!r}")
    if kv_len > text.max_position_embeddings:
        raise ConfigError(
            f"--max-len {kv_len} exceeds the model's max_position_embeddings "
            f"({text.max_position_embeddings})"
        )
    attn = cfg.AttentionConfig(
        num_heads=text.num_attention_heads,
        head_dim=text.head_dim,
        num_query_groups=text.num_key_value_heads,
        rotary_base=int(text.rope_theta),
        rotary_percentage=1.0,
        qkv_use_bias=text.attention_bias,
        causal_mask_value=CAUSAL_MASK_VALUE,
    )
    ff = cfg.FeedForwardConfig(
        type=cfg.FeedForwardType.GATED,
        activation=cfg.ActivationConfig(cfg.ActivationType.SILU),
        intermediate_size=text.intermediate_size,
    )
    norm = cfg.NormalizationConfig(type=cfg.NormalizationType.RMS_NORM, epsilon=text.rms_norm_eps)
    block = cfg.TransformerBlockConfig(
        attn_config=attn,
        ff_config=ff,
        pre_attention_norm_config=norm,
        post_attention_norm_config=norm,
    )
    return cfg.ModelConfig(
        vocab_size=text.vocab_size,
        num_layers=text.num_hidden_layers,
        max_seq_len=kv_len,
        embedding_dim=text.hidden_size,
        block_configs=block,
        final_norm_config=norm,
        lm_head_share_weight_with_embedding=text.tie_word_embeddings,
    )


def reauthor_decoder(model, kv_len: int):
    """Our FastVLMModel's language model + LM head as a litert-torch DecoderOnlyModel."""
    from litert_torch.generative.utilities import model_builder

    text = model.config.text
    if float(text.rope_theta) != int(text.rope_theta):
        raise ConfigError(
            f"rope_theta {text.rope_theta} is not an integer (litert-torch needs one)"
        )
    mcfg = decoder_config(text, kv_len)
    state = {}
    for k, w in model.state_dict().items():
        if k.startswith("language_model."):
            state["model." + k[len("language_model.") :]] = w.float()
        elif k.startswith("lm_head.") and not text.tie_word_embeddings:
            state[k] = w.float()
    names = (
        model_builder.TENSOR_NAMES
        if text.tie_word_embeddings
        else model_builder.TENSOR_NAMES_WITH_SEPARATE_LM_HEAD
    )
    return model_builder.build_decoder_only_model(
        checkpoint_path="",  # weights come from `state`, not a file
        config=mcfg,
        tensor_names=names,
        custom_loader=lambda _path: dict(state),
    )


class EmbedsDecoder(nn.Module):
    """Prefill / decode from input embeddings with an external KV cache and an input mask."""

    def __init__(self, decoder) -> None:
        super().__init__()
        from litert_torch.generative.layers import kv_cache as kv_utils
        from litert_torch.generative.utilities import export_config

        self.decoder = decoder
        # logits only on decode: prefill returns the caches alone (LiteRT-LM's convention)
        self.export_config = export_config.ExportConfig(
            kvcache_layout=kv_utils.KV_LAYOUT_TRANSPOSED, mask_as_input=True
        )

    def forward(self, embeddings, input_pos, kv_cache, mask):
        cfg = self.decoder.config
        attn = cfg.block_config(0).attn_config
        rope = cfg.build_rope(input_pos, attn.head_dim, attn.rotary_base)
        return self.decoder._forward_with_embeds(
            embeddings, rope, mask, input_pos, kv_cache, None, self.export_config
        )


class Embedder(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, token_ids):
        return {"embeddings": self.embed_tokens(token_ids)}


class VisionNHWC(nn.Module):
    """`images` (1, S, S, 3) in [0, 1] → `features` (1, tokens, D): normalisation, encoder and
    projector in one graph (LiteRT-LM passes the encoder output straight to the decoder)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        c = model.config
        self.register_buffer("mean", torch.tensor(c.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = (images.permute(0, 3, 1, 2) - self.mean) / self.std
        return {"features": self.model.embed_images(x)}


def convert_decoder(decoder, kv_len: int, prefill_lens: list[int], quant: str, path) -> None:
    """Export the prefill/decode graph; `quant` is fp32, int8 or int4 (dynamic-range weights)."""
    import litert_torch
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.quantize import quant_attrs, quant_recipes

    mod = EmbedsDecoder(decoder).eval()
    mcfg = decoder.config
    d = mcfg.embedding_dim
    kv = kv_utils.KVCache.from_model_config(kv_len, mcfg, kv_layout=kv_utils.KV_LAYOUT_TRANSPOSED)
    conv = litert_torch.Converter()
    for t in prefill_lens:
        sample = dict(
            embeddings=torch.zeros(1, t, d),
            input_pos=torch.arange(t, dtype=torch.int32),
            kv_cache=kv,
            mask=torch.zeros(1, 1, t, kv_len),
        )
        conv.add_signature(f"prefill_{t}", mod, sample_kwargs=sample)
    sample = dict(
        embeddings=torch.zeros(1, 1, d),
        input_pos=torch.zeros(1, dtype=torch.int32),
        kv_cache=kv,
        mask=torch.zeros(1, 1, 1, kv_len),
    )
    conv.add_signature("decode", mod, sample_kwargs=sample)
    recipe = None
    if quant == "int8":
        recipe = quant_recipes.full_dynamic_recipe(mcfg=mcfg)
    elif quant == "int4":  # block-32 int4, litert-torch's `dynamic_int4_block32`
        recipe = quant_recipes.full_dynamic_recipe(
            mcfg=mcfg,
            weight_dtype=quant_attrs.Dtype.INT4,
            granularity=quant_attrs.Granularity.BLOCKWISE_32,
        )
    conv.convert(quant_config=recipe).export(str(path))


def convert_embedder(model, prefill_lens: list[int], path) -> None:
    import litert_torch

    mod = Embedder(model.language_model.embed_tokens).eval()
    conv = litert_torch.Converter()
    conv.add_signature(
        "decode_embedder", mod, sample_kwargs=dict(token_ids=torch.zeros(1, 1, dtype=torch.int32))
    )
    for t in prefill_lens:
        conv.add_signature(
            f"prefill_embedder_{t}",
            mod,
            sample_kwargs=dict(token_ids=torch.zeros(1, t, dtype=torch.int32)),
        )
    conv.convert().export(str(path))


def convert_vision(model, path) -> None:
    import litert_torch

    s = model.config.vision.image_size
    mod = VisionNHWC(model).eval()
    sample = dict(images=torch.zeros(1, s, s, 3))
    litert_torch.signature("vision_encoder", mod, sample_kwargs=sample).convert().export(str(path))
