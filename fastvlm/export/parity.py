"""Parity check run at the end of every export: exported artefact vs the PyTorch model.

Metrics (batch 1, one sample image + prompt, deterministic):
* image embeddings: max-abs error and cosine similarity (flattened);
* logits over prompt + the 32 reference greedy tokens in one call (teacher forcing): max-abs,
  cosine, and `teacher_forced` = share of those 32 positions whose argmax equals the reference
  token (a per-token score that one early flip cannot cascade into);
* `greedy_match`: free-running greedy decode of 32 tokens through the exported runtime (KV-cache
  path) compared position by position with the PyTorch greedy tokens; `greedy_identical` when all
  match.

Tolerances depend on the precision: fp32 must reproduce PyTorch (logits to ~1e-4, identical
greedy tokens); fp16 / int8 / int4 are held to cosine and agreement floors. `ParityReport.failures`
lists what is out of tolerance; the CLI exits 1 when it is non-empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..engine.generate import generate_step
from ..engine.sampling import SamplingParams

GREEDY_TOKENS = 32
# (min cosine of image embeds, min cosine of logits, min teacher-forced agreement) per weakest part
TOLERANCES = {
    "fp32": (0.99999, 0.99999, 1.0),
    "fp16": (0.999, 0.999, 0.9),
    "int8": (0.99, 0.99, 0.9),
    "int4": (0.95, 0.95, 0.75),
}
ORDER = ("fp32", "fp16", "int8", "int4")


def weakest(*precisions: str) -> str:
    return max(precisions, key=ORDER.index)


def sample_image(size: int = 256):
    """A deterministic test picture (shapes on a light background): no files needed."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 230))
    d = ImageDraw.Draw(img)
    s = size / 256
    d.ellipse([30 * s, 40 * s, 110 * s, 120 * s], fill=(220, 40, 40))
    d.rectangle([140 * s, 130 * s, 220 * s, 210 * s], fill=(40, 80, 220))
    d.polygon([(60 * s, 230 * s), (100 * s, 160 * s), (140 * s, 230 * s)], fill=(40, 170, 60))
    return img


def sample_inputs(model, tokenizer, prompt: str = "Describe this image.", seed: int = 0):
    """(input_ids, pixel_values (1, 3, S, S)) for the parity check."""
    from ..processing import Processor

    cfg = model.config
    proc = Processor(cfg, tokenizer)
    pixels = proc.pixels([sample_image(cfg.vision.image_size)])
    if tokenizer is not None:
        content = [{"type": "image", "image": None}, {"type": "text", "text": prompt}]
        msgs = [{"role": "user", "content": content}]
        from ..processing import render_chat

        text, _ = render_chat(msgs, cfg.chat_template, cfg.system_prompt)
        ids = proc.tokenize(text, 1)
    else:  # no tokenizer: random text ids around the placeholder run
        g = torch.Generator().manual_seed(seed)
        hi = max(4, min(cfg.text.vocab_size, 1000))
        text = torch.randint(0, hi, (12,), generator=g).tolist()
        text = [t if t != cfg.image_token_id else 0 for t in text]
        ids = text[:4] + [cfg.image_token_id] * cfg.num_image_tokens + text[4:]
    return ids, pixels


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@dataclass
class ParityReport:
    target: str
    precision: dict[str, str]
    embeds_max_abs: float | None = None
    embeds_cos: float | None = None
    logits_max_abs: float | None = None
    logits_cos: float | None = None
    teacher_forced: float | None = None
    greedy_match: float | None = None
    greedy_identical: bool | None = None
    tokens: int = GREEDY_TOKENS
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def __str__(self) -> str:
        def f(x, fmt):
            return "n/a" if x is None else format(x, fmt)

        lines = [
            f"parity [{self.target}] " + ",".join(f"{k}={v}" for k, v in self.precision.items()),
            f"  image embeds  max-abs {f(self.embeds_max_abs, '.3g')}  "
            f"cosine {f(self.embeds_cos, '.6f')}",
            f"  logits        max-abs {f(self.logits_max_abs, '.3g')}  "
            f"cosine {f(self.logits_cos, '.6f')}",
            f"  greedy ({self.tokens} tokens)  teacher-forced agreement "
            f"{f(self.teacher_forced, '.1%')}  free-running match {f(self.greedy_match, '.1%')}"
            + ("  (identical)" if self.greedy_identical else ""),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  PASS" if self.passed else "  FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


@torch.inference_mode()
def check(
    model,
    tokenizer,
    target: str,
    precision: dict[str, str],
    *,
    embed_images: Callable[[torch.Tensor], np.ndarray] | None = None,
    logits: Callable[[list[int], np.ndarray], np.ndarray] | None = None,
    greedy: Callable[[list[int], torch.Tensor, int], list[int]] | None = None,
    tokens: int = GREEDY_TOKENS,
    min_agreement: float | None = None,
) -> ParityReport:
    """Compare whichever parts the target can run (any callable may be None)."""
    ids, pixels = sample_inputs(model, tokenizer)
    rep = ParityReport(target, dict(precision), tokens=tokens)
    vis = weakest(precision.get("vision", "fp32"), precision.get("projector", "fp32"))
    text = weakest(precision.get("llm", "fp32"), precision.get("embed", "fp32"), vis)
    cos_img, cos_log, agree = TOLERANCES[vis][0], TOLERANCES[text][1], TOLERANCES[text][2]
    if min_agreement is not None:
        agree = min_agreement
    ref_embeds = model.embed_images(pixels)  # (1, tok, D)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    ref_tokens = list(generate_step(model, ids, pixels, params))
    exp_embeds = None
    if embed_images is not None:
        exp_embeds = np.asarray(embed_images(pixels), np.float32)
        rep.embeds_max_abs = float(np.abs(exp_embeds - ref_embeds.numpy()).max())
        rep.embeds_cos = _cos(exp_embeds, ref_embeds.numpy())
        if rep.embeds_cos < cos_img:
            rep.failures.append(f"image-embedding cosine {rep.embeds_cos:.6f} < {cos_img}")
    if logits is not None:
        full = ids + ref_tokens[:-1]
        ref = model(torch.tensor([full]), image_embeds=ref_embeds).numpy()  # (1, T, V)
        out = np.asarray(logits(full, exp_embeds), np.float32)
        rep.logits_max_abs = float(np.abs(out - ref).max())
        rep.logits_cos = _cos(out, ref)
        n = len(ref_tokens)
        pred = out[0, -n:].argmax(-1)
        rep.teacher_forced = float(np.mean(pred == np.asarray(ref_tokens)))
        if rep.logits_cos < cos_log:
            rep.failures.append(f"logits cosine {rep.logits_cos:.6f} < {cos_log}")
        if rep.teacher_forced < agree:
            rep.failures.append(f"teacher-forced agreement {rep.teacher_forced:.1%} < {agree:.0%}")
    if greedy is not None:
        got = list(greedy(ids, pixels, tokens))
        same = [a == b for a, b in zip(got, ref_tokens, strict=False)]
        rep.greedy_match = sum(same) / len(ref_tokens)
        rep.greedy_identical = got == ref_tokens
        if text == "fp32" and not rep.greedy_identical:
            rep.failures.append("fp32 export: greedy tokens differ from PyTorch")
    return rep
