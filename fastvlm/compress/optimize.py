"""`fastvlm optimize`: search quantization per component × pruning ratio × image-token budget
for the smallest (or fastest) model within a size target and an accuracy-drop budget.

Design decisions:
* Sizes are exact and cheap (bytes of the tensors the saved folder holds, in the save dtype),
  so every combination is sized first and only candidates under `--target-size` are evaluated,
  smallest first; with `--prefer size` the search stops at the first one within the accuracy
  budget (a smaller one was already evaluated and failed).
* Each evaluated candidate (accuracy, decode tok/s, TTFT) is written to a JSON state file as
  soon as it is measured, keyed by its settings and the search's fingerprint, so an
  interrupted search resumes without re-evaluating anything.
* The image-token budget is a runtime setting, not a weight change: the chosen value is
  printed and recorded in the output's `optimize.json` (pass it as `--tokens-per-image`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import quant
from ..api import FastVLM
from ..backends.torch import TorchBackend
from ..device import prepare_for_device
from ..dtypes import resolve_save_dtype
from ..errors import FastVLMError
from ..processing import Processor
from ..train import evaluate as scoring
from .prune import Keep, Ratios, plan, prune_model


@dataclass(slots=True)
class Candidate:
    llm: str = "none"
    projector: str = "none"
    vision: str = "none"
    prune: float = 0.0
    tokens: int = 0  # image tokens per image
    size_mb: float = 0.0
    accuracy: float | None = None
    decode_tps: float | None = None
    ttft_ms: float | None = None
    skipped: str = ""  # why it was not evaluated / not eligible

    @property
    def key(self) -> str:
        return f"{self.quant_spec}|p{self.prune}|t{self.tokens}"

    @property
    def quant_spec(self) -> str:
        return f"llm={self.llm},projector={self.projector},vision={self.vision}"


@dataclass(slots=True)
class SearchSpace:
    llm: tuple[str, ...] = ("none", "int8", "int4-g64", "int4-g32")
    projector: tuple[str, ...] = ("none", "int8")
    vision: tuple[str, ...] = ("none", "int8")
    prune: tuple[float, ...] = (0.0, 0.25, 0.5)
    tokens: tuple[int, ...] = field(default_factory=tuple)  # () = native and native/4


def state_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of the tensors `save_model` writes: floats in `dtype`, integers as they are;
    a tied lm_head is stored once, BatchNorm step counters not at all."""
    tied = model.config.text.tie_word_embeddings
    n = 0
    for k, t in model.state_dict().items():
        if k.endswith("num_batches_tracked") or (k == "lm_head.weight" and tied):
            continue
        if k.endswith(".qweight") and isinstance(t, torch.Tensor) and t.numel() == 0:
            continue
        size = torch.finfo(dtype).bits // 8 if t.is_floating_point() else t.element_size()
        n += t.numel() * size
    return n


def prune_ratios(ratio: float, multiple_of: int) -> Ratios:
    """One search knob → uniform ratios: MLP channels and KV groups at `ratio`."""
    return Ratios(mlp=ratio, heads=ratio, multiple_of=multiple_of)


def build(base, keep_for, c: Candidate):
    """The candidate's model: pruned (uniform ratio, precomputed plan), then quantized."""
    model = prune_model(base, keep_for(c.prune)) if c.prune else copy.deepcopy(base)
    if c.quant_spec != "llm=none,projector=none,vision=none":
        quant.quantize_model(model, c.quant_spec)
    return model.eval()


def token_budgets(native: int, given: tuple[int, ...]) -> tuple[int, ...]:
    if given:
        for k in given:
            if math.isqrt(k) ** 2 != k or not 0 < k <= native:
                raise FastVLMError(f"--tokens {k}: a perfect square <= {native} is needed")
        return tuple(sorted(set(given), reverse=True))
    side = math.isqrt(native)
    quarter = (side // 2) ** 2
    return (native, quarter) if quarter and quarter != native else (native,)


def measure_speed(
    vlm, image, tokens: int, n_tokens: int = 32, repeats: int = 3
) -> tuple[float, float]:
    """(decode tok/s, TTFT ms), medians of `repeats` greedy runs of `n_tokens` tokens."""
    tps, ttft = [], []
    for _ in range(repeats):
        vlm.describe(image, "Describe this image.", max_tokens=n_tokens, ignore_eos=True,
                     tokens_per_image=tokens)  # fmt: skip
        s = vlm.last_stats
        tps.append(s.decode_tps)
        ttft.append(s.ttft_s * 1000)
    return statistics.median(tps), statistics.median(ttft)


def _fingerprint(source: str, rows_key: str, space: SearchSpace, extra: dict) -> str:
    h = hashlib.sha256(json.dumps([source, rows_key, asdict(space), extra], sort_keys=True,
                                  default=str).encode())  # fmt: skip
    return h.hexdigest()[:16]


def load_state(path: Path, fingerprint: str) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if d.get("fingerprint") != fingerprint:
        print(f"{path}: made by a different search; starting over", file=sys.stderr)
        return {}
    return d.get("candidates", {})


def save_state(path: Path, fingerprint: str, done: dict[str, dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "candidates": done}, indent=1))
    tmp.replace(path)  # atomic: a kill never leaves a half-written state


def search(
    vlm,
    rows: list[dict],
    *,
    target_mb: float,
    max_drop: float,
    space: SearchSpace,
    state_path: Path,
    keep_for,
    prefer: str = "size",
    max_candidates: int = 12,
    max_tokens: int = 64,
    source: str = "",
    progress: bool = True,
) -> tuple[list[Candidate], Candidate | None, float]:
    """All candidates (sized; evaluated where needed), the chosen one, baseline accuracy (pts)."""
    from tqdm import tqdm

    base = vlm.model
    dtype = resolve_save_dtype("auto", base)
    native = base.config.num_image_tokens
    budgets = token_budgets(native, space.tokens)
    combos = list(itertools.product(space.llm, space.projector, space.vision, space.prune, budgets))
    fingerprint = _fingerprint(source, str(len(rows)), space, {"max_tokens": max_tokens})
    done = load_state(state_path, fingerprint)
    sized: dict[tuple, float] = {}
    cands: list[Candidate] = []
    for llm, proj, vis, p, tok in tqdm(combos, desc="size", disable=not progress, leave=False):
        c = Candidate(llm, proj, vis, p, tok)
        skey = (llm, proj, vis, p)
        if skey not in sized:
            sized[skey] = state_bytes(build(base, keep_for, c), dtype) / 2**20
        c.size_mb = round(sized[skey], 3)
        if c.key in done:
            c = Candidate(**done[c.key])
        cands.append(c)
    cands.sort(key=lambda c: (c.size_mb, -c.tokens))
    image = rows[0]["image"]

    def evaluate_one(c: Candidate) -> None:
        model = prepare_for_device(build(base, keep_for, c), vlm.device)  # as load() would
        backend = TorchBackend(model, eos_ids=vlm.eos_ids, vocab_limit=vlm.vocab_limit)
        cand = FastVLM(backend, Processor(model.config, vlm.tokenizer), vlm.tokenizer)
        s = scoring.evaluate(
            cand, rows, max_tokens, None, progress=False, tokens_per_image=c.tokens
        )
        c.accuracy = round(100 * (s["qa_accuracy"] if s["qa_accuracy"] is not None
                                  else s["caption_exact"]), 2)  # fmt: skip
        c.decode_tps, c.ttft_ms = (round(x, 1) for x in measure_speed(cand, image, c.tokens))
        done[c.key] = asdict(c)
        save_state(state_path, fingerprint, done)

    ref = next(
        c for c in cands if c.quant_spec.count("none") == 3 and not c.prune and c.tokens == native
    )
    todo = [c for c in cands if c.size_mb <= target_mb]
    for c in cands:
        if c.size_mb > target_mb:
            c.skipped = "over size"
    bar = tqdm(total=min(len(todo), max_candidates) + 1, desc="evaluate", disable=not progress)
    if ref.accuracy is None:
        evaluate_one(ref)
    bar.update(1)
    floor = ref.accuracy - max_drop
    evaluated = 0
    for c in todo:
        if evaluated >= max_candidates:
            c.skipped = c.skipped or "not evaluated (--max-candidates)"
            continue
        if c.accuracy is None:
            evaluate_one(c)
        evaluated += 1
        bar.update(1)
        if prefer == "size" and c.accuracy >= floor:
            break
    bar.close()
    ok = [c for c in todo if c.accuracy is not None and c.accuracy >= floor]
    for c in todo:
        if c.accuracy is not None and c.accuracy < floor:
            c.skipped = "accuracy"
        elif c.accuracy is None and not c.skipped:
            c.skipped = "not evaluated (a smaller one qualified)"
    if not ok:
        return cands, None, ref.accuracy
    best = (min(ok, key=lambda c: (c.size_mb, -c.accuracy)) if prefer == "size"
            else max(ok, key=lambda c: (c.decode_tps or 0.0, -c.size_mb)))  # fmt: skip
    return cands, best, ref.accuracy


def table(cands: list[Candidate], best: Candidate | None, base_acc: float) -> str:
    head = (f"{'llm':<10} {'proj':<5} {'vision':<6} {'prune':>5} {'tokens':>6} {'size MB':>8} "
            f"{'decode tok/s':>12} {'TTFT ms':>8} {'acc':>6} {'drop':>6}  note")  # fmt: skip
    out = [head]
    for c in cands:
        acc = "" if c.accuracy is None else f"{c.accuracy:.1f}"
        drop = "" if c.accuracy is None else f"{base_acc - c.accuracy:.1f}"
        tps = "" if c.decode_tps is None else f"{c.decode_tps:.0f}"
        ttft = "" if c.ttft_ms is None else f"{c.ttft_ms:.0f}"
        note = "<- chosen" if best is not None and c.key == best.key else c.skipped
        out.append(f"{c.llm:<10} {c.projector:<5} {c.vision:<6} {c.prune:>5.2f} {c.tokens:>6} "
                   f"{c.size_mb:>8.2f} {tps:>12} {ttft:>8} {acc:>6} {drop:>6}  {note}")  # fmt: skip
    return "\n".join(out)


def keep_planner(model, scores, multiple_of: int):
    """ratio → Keep, cached (the plan depends only on the ratio)."""
    cache: dict[float, Keep] = {}

    def keep_for(ratio: float) -> Keep:
        if ratio not in cache:
            cache[ratio] = plan(model, scores, prune_ratios(ratio, multiple_of))
        return cache[ratio]

    return keep_for
