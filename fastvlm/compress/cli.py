"""`fastvlm prune | distill | optimize`: argument parsing and folder I/O around prune.py,
distill.py and optimize.py (each tool a `main(argv)`, as every other subcommand)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from ..api import load
from ..config import FastVLMConfig
from ..device import resolve_device
from ..errors import FastVLMError
from ..model.fastvlm import FastVLMModel
from ..quant import Scheme
from ..train import distributed
from ..train.args import Parser
from ..train.checkpoint import save_model
from ..train.config import TrainConfig
from ..train.evaluate import load_rows as eval_rows
from ..train.loop import train
from . import data as cdata
from .distill import DistillConfig, distill, list_images, write_targets
from .importance import METHODS, compute_scores
from .optimize import SearchSpace, build, keep_planner, search, table
from .prune import Ratios, parameter_count, plan, prune_model
from .qat import apply_qat, strip_qat


def _load(model: str | None, device: str = "cpu"):
    return load(model, device=device, dtype="float32", engine="reference")


def _calibration(vlm, a) -> list[dict] | None:
    if a.importance == "magnitude":
        return None
    rows = cdata.load_rows(a.data, a.image_dir, a.calib_shapes, a.data_seed,
                           vlm.config.vision.image_size)  # fmt: skip
    stream = cdata.batches(rows, vlm.processor, a.calib_batch_size, seed=a.seed,
                           pad_id=cdata.pad_id_of(vlm.tokenizer))  # fmt: skip
    return [next(stream) for _ in range(a.calib_batches)]


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FastVLMError(f"{out} exists and is not empty (use --overwrite)")


def _save(out: Path, model, vlm) -> None:
    save_model(out, model, vlm.tokenizer, vlm.path)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="calibration / training rows (files train reads)")
    p.add_argument("--image-dir", default=None)
    p.add_argument("--data-seed", type=int, default=0, help="shapes scenes seed (demo model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _importance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--importance", choices=METHODS, default="activation")
    p.add_argument("--calib-shapes", type=int, default=64, help="shapes scenes for calibration")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--multiple-of", type=int, default=32, help="round kept channels to this")


# ---------------------------------------------------------------------- prune
def prune_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="fastvlm prune", description="Structured pruning to a smaller dense model.")
    p.add_argument("model", help="model id or folder ('demo' = the embedded model)")
    p.add_argument("out")
    p.add_argument("--ratio", type=float, default=None, help="MLP and head ratio together")
    p.add_argument("--mlp-ratio", type=float, default=0.0)
    p.add_argument("--head-ratio", type=float, default=0.0)
    p.add_argument("--layer-ratio", type=float, default=0.0)
    p.add_argument("--projector-ratio", type=float, default=0.0,
                   help="also prune projector width (fastvlm format only)")  # fmt: skip
    p.add_argument("--heal-steps", type=int, default=0, help="fine-tune after pruning (train loop)")
    p.add_argument("--heal-shapes", type=int, default=2000)
    p.add_argument("--heal-lr", type=float, default=2e-4)
    p.add_argument("--heal-batch-size", type=int, default=16)
    _common(p)
    _importance_args(p)
    a = p.parse_args(argv)
    r = a.ratio
    ratios = Ratios(mlp=a.mlp_ratio if r is None else r, heads=a.head_ratio if r is None else r,
                    layers=a.layer_ratio, projector=a.projector_ratio,
                    multiple_of=a.multiple_of)  # fmt: skip
    ratios.check()
    if a.heal_steps < 0:
        raise FastVLMError(f"--heal-steps must be >= 0, got {a.heal_steps}")
    out = Path(a.out)
    _check_out(out, a.overwrite)
    vlm = _load(None if a.model == "demo" else a.model, a.device)
    scores = compute_scores(vlm.model, a.importance, _calibration(vlm, a))
    keep = plan(vlm.model, scores, ratios)
    pruned = prune_model(vlm.model, keep)
    before, after = parameter_count(vlm.model), parameter_count(pruned)
    t = pruned.config.text
    print(f"pruned ({a.importance}): {before / 1e6:.2f} M → {after / 1e6:.2f} M parameters; "
          f"decoder: {t.num_hidden_layers} layers, MLP {t.intermediate_size}, "
          f"{t.num_attention_heads} heads / {t.num_key_value_heads} KV heads, projector "
          f"{pruned.config.projector_hidden_size}", file=sys.stderr)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    _save(out, pruned, vlm)
    if a.heal_steps:
        heal(out, a)
    print(out)
    return 0


def heal(folder: Path, a) -> None:
    """A short full fine-tune of the pruned folder by the training loop (same data pipeline,
    schedule and checkpoint format); the healed weights replace the folder's."""
    tmp = Path(tempfile.mkdtemp(prefix="heal-", dir=folder.parent))
    cfg = TrainConfig(
        output=tmp / "run", model=str(folder), data=a.data, image_dir=a.image_dir,
        shapes=0 if a.data else a.heal_shapes, data_seed=a.data_seed, max_steps=a.heal_steps,
        batch_size=a.heal_batch_size, lr=a.heal_lr, warmup=max(1, a.heal_steps // 10),
        seed=a.seed, device=a.device, quiet=a.quiet,
    )  # fmt: skip
    try:
        train(cfg)
        for f in ("model.safetensors", "config.json"):
            shutil.copy2(tmp / "run" / f, folder / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- distill
def distill_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="fastvlm distill", description="Knowledge distillation into a student.")
    p.add_argument("--teacher", required=True, help="model id or folder ('demo' = embedded)")
    p.add_argument("--student", default=None, help="a student folder (e.g. a pruned teacher)")
    p.add_argument("--init-config", default=None, help="or a fresh student from config.json")
    p.add_argument("--copy-vision", action="store_true", help="with --init-config: start "
                   "from the teacher's vision tower (same vision config), frozen")  # fmt: skip
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--shapes", type=int, default=0, help="generated shapes rows (demo model)")
    p.add_argument("--images", default=None, help="unlabelled images: the teacher writes answers")
    p.add_argument("--prompts", nargs="+", default=["Describe this image."])
    p.add_argument("--targets", default=None, help="JSONL cache of teacher answers (resumable)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.9, help="KD weight (0 = no teacher)")
    p.add_argument("--hidden-weight", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--qat", default=None, help="train the student quantization-aware (a --quant "
                   "spec, e.g. int4 or llm=int4-g64); the saved student is float")  # fmt: skip
    p.add_argument("--log-every", type=int, default=0)
    _common(p)
    a = p.parse_args(argv)
    if (a.student is None) == (a.init_config is None):
        raise FastVLMError("give the student as --student FOLDER or --init-config CONFIG")
    if a.copy_vision and not a.init_config:
        raise FastVLMError("--copy-vision goes with --init-config (a --student has its own tower)")
    if sum(x is not None and x != 0 for x in (a.data, a.images, a.shapes or None)) != 1:
        raise FastVLMError("give one data source: --data FILE, --images DIR or --shapes N")
    cfg = DistillConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                        temperature=a.temperature, alpha=a.alpha, hidden_weight=a.hidden_weight,
                        seed=a.seed, max_length=a.max_length, log_every=a.log_every,
                        quiet=a.quiet)  # fmt: skip
    cfg.check()
    out = Path(a.output)
    rank, world = distributed.world()
    if rank == 0:
        _check_out(out, a.overwrite)
    device = distributed.init(resolve_device(a.device))
    teacher = _load(None if a.teacher == "demo" else a.teacher, device)
    student = _student(a, teacher, device)
    if a.qat:
        apply_qat(student, a.qat)
    rows_data = a.data
    if a.images:
        cache = Path(a.targets or out.with_name(out.name + "-targets.jsonl"))
        if rank == 0:
            n = write_targets(teacher, list_images(Path(a.images)), a.prompts, cache,
                              max_tokens=a.max_tokens, progress=not a.quiet)  # fmt: skip
            print(f"teacher answers: {n} new, cached in {cache}", file=sys.stderr)
        if world > 1:  # the other ranks read the cache rank 0 wrote
            torch.distributed.barrier()
        rows_data = str(cache)
    size = teacher.config.vision.image_size
    records = cdata.load_rows(rows_data, a.image_dir, a.shapes, a.data_seed, size)
    model = distill(teacher.model, student, records, teacher.processor, cfg,
                    pad_id=cdata.pad_id_of(teacher.tokenizer))  # fmt: skip
    strip_qat(model)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        src = teacher.path if a.student in (None, "demo") else Path(a.student)
        # QAT: fp32, so `fastvlm quantize` rounds exactly the weights training fake-quantized
        save_model(out, model, teacher.tokenizer, src, torch.float32 if a.qat else None)
        t, s = parameter_count(teacher.model), parameter_count(model)
        msg = f"student {s / 1e6:.2f} M parameters (teacher {t / 1e6:.2f} M, {t / s:.1f}x)"
        print(f"{msg} → {out}", file=sys.stderr)
    distributed.close()
    return 0


def _student(a, teacher, device):
    if a.student:
        return _load(None if a.student == "demo" else a.student, device).model.train()
    try:
        cfg = FastVLMConfig.from_dict(json.loads(Path(a.init_config).read_text()))
        cfg.validate()
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise FastVLMError(f"--init-config {a.init_config}: not a usable config ({e})") from e
    cfg.text.vocab_size = teacher.config.text.vocab_size  # the teacher's tokenizer
    torch.manual_seed(a.seed)
    model = FastVLMModel(cfg).to(device)
    model.init_weights()
    if a.copy_vision:
        if cfg.vision != teacher.config.vision:
            raise FastVLMError("--copy-vision needs the teacher's vision config in --init-config")
        model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
        model.vision_tower.requires_grad_(False)
    return model.train()


# ---------------------------------------------------------------------- optimize
def optimize_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="fastvlm optimize", description="Smallest model within size / accuracy.")
    p.add_argument("model", help="model id or folder ('demo' = the embedded model)")
    p.add_argument("out")
    p.add_argument("--target-size", type=float, required=True, help="MB (2^20 bytes)")
    p.add_argument("--max-accuracy-drop", type=float, default=2.0, help="points")
    p.add_argument("--eval", default=None, help="rows to score (files eval reads)")
    p.add_argument("--eval-shapes", type=int, default=50, help="else N held-out shapes scenes")
    p.add_argument("--eval-seed", type=int, default=1000)
    p.add_argument("--prefer", choices=("size", "speed"), default="size")
    space = SearchSpace()
    p.add_argument("--llm", nargs="+", default=list(space.llm), help="LLM schemes to try")
    p.add_argument("--projector", nargs="+", default=list(space.projector))
    p.add_argument("--vision", nargs="+", default=list(space.vision))
    p.add_argument("--prune", nargs="+", type=float, default=list(space.prune),
                   help="MLP + KV-group pruning ratios to try")  # fmt: skip
    p.add_argument("--tokens", nargs="+", type=int, default=[])
    p.add_argument("--max-candidates", type=int, default=12)
    p.add_argument("--state", default=None, help="resume file (default OUT.optimize-state.json)")
    _common(p)
    _importance_args(p)
    a = p.parse_args(argv)
    if a.target_size <= 0 or a.max_accuracy_drop < 0:
        raise FastVLMError("--target-size must be > 0 and --max-accuracy-drop >= 0")
    for s in (*a.llm, *a.projector, *a.vision):
        Scheme.parse(s)  # a bad scheme fails before any work
    for r in a.prune:
        Ratios(mlp=r).check()
    for k in a.tokens:  # the model's own limit is checked once it is loaded
        if k < 1 or math.isqrt(k) ** 2 != k:
            raise FastVLMError(f"--tokens {k}: image-token budgets are perfect squares (16, 64)")
    out = Path(a.out)
    _check_out(out, a.overwrite)
    ns = argparse.Namespace(
        shapes=0 if a.eval else a.eval_shapes, data=a.eval, image_dir=a.image_dir,
        data_seed=a.eval_seed, shapes_size=256,
    )  # fmt: skip
    vlm = _load(None if a.model == "demo" else a.model, a.device)
    ns.shapes_size = vlm.config.vision.image_size
    rows, _ = eval_rows(ns)
    scores = compute_scores(vlm.model, a.importance, _calibration(vlm, a))
    space = SearchSpace(tuple(a.llm), tuple(a.projector), tuple(a.vision), tuple(a.prune),
                        tuple(a.tokens))  # fmt: skip
    # kept channels a multiple of every int4 group size tried, so no layer falls back to float
    groups = [Scheme.parse(x).group_size for x in (*a.llm, *a.projector, *a.vision)]
    multiple_of = max([a.multiple_of, *groups])
    state = Path(a.state or out.with_name(out.name + ".optimize-state.json"))
    cands, best, base_acc = search(
        vlm, rows, target_mb=a.target_size, max_drop=a.max_accuracy_drop, space=space,
        state_path=state, keep_for=keep_planner(vlm.model, scores, multiple_of),
        prefer=a.prefer, max_candidates=a.max_candidates, source=str(vlm.path),
        progress=not a.quiet,
    )  # fmt: skip
    print(table(cands, best, base_acc))
    if best is None:
        raise FastVLMError(
            f"no candidate is within {a.target_size} MB and {a.max_accuracy_drop} points of the "
            f"baseline ({base_acc:.1f}); raise --target-size or --max-accuracy-drop"
        )
    model = build(vlm.model, keep_planner(vlm.model, scores, multiple_of), best)
    out.mkdir(parents=True, exist_ok=True)
    _save(out, model, vlm)
    record = {**asdict(best), "baseline_accuracy": base_acc, "target_size_mb": a.target_size}
    (out / "optimize.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"chosen: {best.quant_spec}, prune {best.prune}, {best.tokens} image tokens "
          f"(use --tokens-per-image {best.tokens}), {best.size_mb:.2f} MB → {out}")
    print(json.dumps(asdict(best)))
    return 0


TOOLS = {"prune": prune_main, "distill": distill_main, "optimize": optimize_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TOOLS:
        raise FastVLMError(f"usage: python -m fastvlm.compress.cli {{{','.join(TOOLS)}}} ...")
    return TOOLS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
