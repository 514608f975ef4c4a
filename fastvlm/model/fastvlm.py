"""FastVLM = FastViTHD vision tower + `mlp2x_gelu` projector + Qwen2 decoder + LM head.

The one multimodal seam is `embed_images(pixel_values) -> (N, tokens, D)`. Image placeholders are
expanded to `num_image_tokens` copies of `image_token_id` *before* the model runs (processing.py),
so sequence lengths are known up front and merging is a masked scatter whose count is asserted.
Apple's −200 sentinel and transformers' 256×`<image>` ids both reduce to this form.

Token reduction: `embed_images(px, tokens_per_image=K)` average-pools the encoder's side × side
feature grid (16×16 = 256 for the released models at 1024 px) to a √K × √K grid *before* the
projector (adaptive average pooling keeps the row-major spatial layout the LLM was trained on);
the processor expands each image to K placeholders to match.

Internal parameter names ("our own format") are Apple's with the wrapper prefixes stripped:
`vision_tower.*`, `mm_projector.{0,2}.*`, `language_model.{embed_tokens,layers,norm}.*`, `lm_head`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FastVLMConfig
from ..options import short_list, tokens_per_image_choices, valid_tokens_per_image
from .fastvithd import FastViTHD, RepCPE, RepMixer, identity_kernel
from .qwen2 import KVCacheLike, Qwen2Model


def check_tokens_per_image(tokens_per_image: int | None, native: int) -> int:
    """The number of image tokens to use: `native` for None, else a validated perfect square."""
    if tokens_per_image is None:
        return native
    k = tokens_per_image
    if not valid_tokens_per_image(k, native):
        choices = short_list(tokens_per_image_choices(native))
        raise ValueError(
            f"tokens_per_image must be a perfect square no larger than this model's native "
            f"{native} image tokens ({choices}), got {tokens_per_image!r}"
        )
    return k


class FastVLMModel(nn.Module):
    def __init__(self, config: FastVLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d_text, d_proj = config.text.hidden_size, config.projector_hidden_size
        self.vision_tower = FastViTHD(config.vision)
        self.mm_projector = nn.Sequential(
            nn.Linear(config.vision.hidden_size, d_proj), nn.GELU(), nn.Linear(d_proj, d_text)
        )
        self.language_model = Qwen2Model(config.text)
        self.lm_head = nn.Linear(d_text, config.text.vocab_size, bias=False)
        self.tie_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh-model init for training from scratch.

        LLM side: HF-style N(0, 0.02). Vision convs: variance-preserving He init (fan-in, GELU
        ≈ ReLU gain). PyTorch's default conv init shrinks the signal ~3x per layer, and the fused
        FastViTHD is a deep chain of plain convs (no BN on the main path), so with it the image
        features of different images differ by ~1e-8 and the LLM learns to ignore the image.
        """
        for m in [*self.language_model.modules(), *self.mm_projector.modules(), self.lm_head]:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for m in self.vision_tower.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
        # Fused RepMixer / RepCPE convs contain the residual: start them as identity + a small
        # perturbation, which is what re-parameterising a freshly initialised train-time block
        # gives (x + layer_scale·(...)), so colour and position pass through the stages intact.
        for m in self.vision_tower.modules():
            if isinstance(m, (RepMixer, RepCPE)) and hasattr(m, "reparam_conv"):
                w = m.reparam_conv.weight
                w.copy_(identity_kernel(m.dim, m.dim, w.shape[-1], w) + 0.02 * torch.randn_like(w))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    # ------------------------------------------------------------------ vision
    def encode_images(
        self, pixel_values: torch.Tensor, tokens_per_image: int | None = None
    ) -> torch.Tensor:
        """(N, 3, S, S) → vision features (N, tokens, C) in row-major (h, w) order; with
        `tokens_per_image` the (h, w) grid is average-pooled to √tokens × √tokens first."""
        feats = self.vision_tower(pixel_values.to(self.lm_head.weight.dtype))  # (N, C, h, w)
        native = feats.shape[-2] * feats.shape[-1]
        k = check_tokens_per_image(tokens_per_image, native)
        if k != native:
            feats = F.adaptive_avg_pool2d(feats, math.isqrt(k))  # (N, C, √k, √k)
        return feats.flatten(2).transpose(1, 2)

    def embed_images(
        self, pixel_values: torch.Tensor, tokens_per_image: int | None = None
    ) -> torch.Tensor:
        """(N, 3, S, S) → projected image embeddings (N, tokens, D); see `encode_images`."""
        return self.mm_projector(self.encode_images(pixel_values, tokens_per_image))

    # ------------------------------------------------------------------ text
    def embed(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with image placeholder rows replaced by `image_embeds` (N, tok, D)."""
        is_image = input_ids == self.config.image_token_id
        safe_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
        embeds = self.language_model.embed_tokens(safe_ids)  # (B, T, D)
        n_slots = int(is_image.sum())
        if image_embeds is None:
            if n_slots:
                raise ValueError(f"{n_slots} image placeholder tokens but no image was given")
            return embeds
        rows = image_embeds.reshape(-1, image_embeds.shape[-1])
        if rows.shape[0] != n_slots:
            raise ValueError(
                f"image features ({rows.shape[0]} rows) and image placeholder tokens "
                f"({n_slots}) do not match"
            )
        return embeds.masked_scatter(is_image[..., None], rows.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (N, 3, S, S)
        *,
        image_embeds: torch.Tensor | None = None,  # (N, tokens, D), instead of pixel_values
        positions: torch.Tensor | None = None,  # (B, T); default 0..T-1
        mask: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) (or (B, 1, V) with `last_only`). No cache unless one is passed."""
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.embed_images(pixel_values)
        x = self.embed(input_ids, image_embeds)
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        h = self.language_model(x, positions, mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)
