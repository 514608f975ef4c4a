"""`TrainConfig`: every setting a training run reads, typed, with the `fastvlm train` defaults.

The CLI builds one from its flags (args.py); a notebook builds one directly and calls
`fastvlm.train.loop.train(cfg)`. Every bad value is one `FastVLMError` naming the setting (as its
`--flag`), raised before a model is loaded or a folder written.

Design decisions:
* One declarative table of numeric bounds (`BOUNDS`) instead of per-field `if`s, so a new field
  gets its check by adding a row; NaN / inf are refused for every float field.
* Types are checked from the dataclass annotations (`check_types`), so a config built in Python
  with a wrong type (`batch_size="8"`) is refused like a bad flag, not a traceback mid-run.
* Checks that need the model (a quantized checkpoint) or the data (warm-up longer than the run)
  are `check_model_config` / `check_schedule`, called as soon as those are known.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import SAVE_DTYPE_CHOICES
from ..errors import FastVLMError
from ..quant import parse_spec
from .lora import DEFAULT_TARGETS

FREEZE_PARTS = ("vision", "projector", "llm")
SHAPES_LAYOUTS = ("mixed", "qa-first", "separate")
DEFAULT_WARMUP = 50
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


@dataclass(slots=True)
class TrainConfig:
    """One training run (field = the `fastvlm train` flag with `-` as `_`; same defaults)."""

    output: str | Path
    # model: fine-tune `model`, or train from scratch from `init_config` + `tokenizer`
    model: str | None = None
    init_config: str | None = None
    tokenizer: str | None = None
    init_vision: str | None = None
    trust_pickle: bool = False
    # data: a file, or `shapes` generated scenes
    data: str | None = None
    image_dir: str | None = None
    shapes: int = 0
    data_seed: int = 0
    shapes_max_count: int = 4
    shapes_layout: str = "mixed"
    max_length: int = 2048
    # optimisation
    epochs: int = 1
    max_steps: int = 0
    stop_after: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    warmup: int | None = None  # None: DEFAULT_WARMUP, or a tenth of a shorter run
    weight_decay: float = 0.0
    vision_lr_mult: float = 1.0
    clip: float = 1.0
    freeze: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    save_every: int = 0
    keep: int = 2
    resume: bool = False
    force: bool = False
    overwrite: bool = False
    save_dtype: str = "auto"
    log_every: int = 0
    quiet: bool = False
    # LoRA
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_projector: bool = False
    lora_vision: bool = False
    qlora: bool = False
    merge: bool = False
    # quantization-aware training: a `fastvlm quantize --quant` spec (int4, int8, llm=int4-g64)
    qat: str | None = None


# field -> (lowest allowed, lowest is exclusive?, highest allowed or None, what it is)
BOUNDS: dict[str, tuple[float, bool, float | None, str]] = {
    "batch_size": (1, False, None, "rows per micro-batch"),
    "grad_accum": (1, False, None, "micro-batches per step"),
    "epochs": (1, False, None, "passes over the data"),
    "max_steps": (0, False, None, "0 = epochs decide"),
    "stop_after": (0, False, None, "0 = run to the end"),
    "save_every": (0, False, None, "0 = no periodic checkpoints"),
    "keep": (1, False, None, "checkpoints to keep"),
    "log_every": (0, False, None, "0 = no JSON log lines"),
    "warmup": (0, False, None, "warm-up steps"),
    "workers": (0, False, None, "data-loading processes, 0 = inline"),
    "max_length": (1, False, None, "tokens per row"),
    "lr": (0, False, None, "learning rate; 0 keeps the weights"),
    "weight_decay": (0, False, None, "AdamW weight decay"),
    "vision_lr_mult": (0, False, None, "vision lr factor"),
    "clip": (0, False, None, "gradient-norm clip, 0 = off"),
    "shapes": (0, False, None, "generated scenes"),
    "shapes_max_count": (1, False, None, "shapes per scene"),
    "lora_r": (1, False, None, "adapter rank"),
    "lora_alpha": (0, True, None, "adapter scale numerator"),
    "lora_dropout": (0, False, 1, "dropout probability, below 1"),
}
# annotation -> accepted Python types (bool is not an int here: `batch_size=True` is a mistake)
_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "str | Path": (str, Path), "str | None": (str, Path), "int | None": (int,),
    "list[str]": (list, tuple),
}  # fmt: skip


def _flag(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def normalized(cfg: TrainConfig) -> TrainConfig:
    """A copy with path objects as strings (the run is recorded as JSON); the loop changes only
    its copy (`check_schedule` fills in `warmup`)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return dataclasses.replace(
        cfg, **{k: str(v) for k, v in values.items() if isinstance(v, Path)}
    )


def check_types(cfg: TrainConfig) -> None:
    """Refuse a field whose value has the wrong type (the annotations are the schema)."""
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if v is None and "None" in f.type:
            continue
        ok = _TYPES[f.type]
        if not isinstance(v, ok) or (isinstance(v, bool) and bool not in ok):
            raise FastVLMError(
                f"{_flag(f.name)} must be {f.type}, got {type(v).__name__} {v!r}"
            )
        if f.type == "list[str]" and not all(isinstance(x, str) for x in v):
            raise FastVLMError(f"{_flag(f.name)} must be a list of names, got {v!r}")


def check_config(cfg: TrainConfig) -> None:
    """Raise FastVLMError for the first setting that cannot give a working run."""
    check_types(cfg)
    if not (cfg.data or cfg.shapes):
        raise FastVLMError("give --data FILE (or --shapes N)")
    check_train_args(cfg)
    if cfg.merge and not (cfg.lora or cfg.qlora):
        raise FastVLMError("--merge folds a LoRA adapter into the model: use it with --lora")
    if (cfg.lora or cfg.qlora) and cfg.freeze:
        raise FastVLMError("--lora already freezes every base weight; drop --freeze")
    if cfg.qat is not None:
        parse_spec(cfg.qat)  # a bad scheme fails before anything is loaded
        if cfg.qlora:
            raise FastVLMError("--qat fake-quantizes a float model; --qlora's base is 4-bit")


def check_train_args(a: TrainConfig) -> None:
    """The per-setting checks of `check_config` (bounds, combinations, files)."""
    for attr, (lo, lo_open, hi, what) in BOUNDS.items():
        v = getattr(a, attr, None)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise FastVLMError(f"{_flag(attr)} must be a finite number ({what}), got {v}")
        if v < lo or (lo_open and v == lo) or (hi is not None and v >= hi):
            rng = f"{'>' if lo_open else '>='} {lo:g}"
            rng += f" and < {hi:g}" if hi is not None else ""
            raise FastVLMError(f"{_flag(attr)} must be {rng} ({what}), got {v:g}")
    if a.max_steps and a.warmup is not None and a.warmup > a.max_steps:
        raise FastVLMError(
            f"--warmup {a.warmup} is longer than the run (--max-steps {a.max_steps}): "
            "the learning rate would never reach --lr"
        )
    if a.stop_after and a.max_steps and a.stop_after > a.max_steps:
        raise FastVLMError(f"--stop-after {a.stop_after} is past --max-steps {a.max_steps}")
    bad = [f for f in a.freeze or [] if f not in FREEZE_PARTS]
    if bad:
        raise FastVLMError(f"--freeze takes any of {', '.join(FREEZE_PARTS)}; got {bad[0]!r}")
    if a.shapes_layout not in SHAPES_LAYOUTS:
        raise FastVLMError(
            f"--shapes-layout takes {', '.join(SHAPES_LAYOUTS)}; got {a.shapes_layout!r}"
        )
    if a.save_dtype not in SAVE_DTYPE_CHOICES:
        choices = ", ".join(SAVE_DTYPE_CHOICES)
        raise FastVLMError(f"--save-dtype takes {choices}; got {a.save_dtype!r}")
    if a.model and a.init_config:
        raise FastVLMError("give --model (fine-tune) or --init-config (from scratch), not both")
    if a.data and a.shapes:
        raise FastVLMError("give --data FILE or --shapes N, not both")
    if a.data:
        data = Path(a.data)
        if not data.is_file():
            what = "is a folder, not a file" if data.is_dir() else "not found"
            raise FastVLMError(f"--data {data}: {what}")
        if data.suffix.lower() not in DATA_SUFFIXES:
            raise FastVLMError(
                f"--data {data}: unsupported file type {data.suffix!r} "
                f"(use {', '.join(DATA_SUFFIXES)})"
            )
    out = Path(a.output)
    if a.model and Path(a.model).exists() and Path(a.model).resolve() == out.resolve():
        raise FastVLMError("--output must be a new folder, not the --model folder itself")
    parent = next((p for p in out.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FastVLMError(f"--output {out}: {parent} is a file, not a folder")
    if a.image_dir and not Path(a.image_dir).is_dir():
        raise FastVLMError(f"--image-dir {a.image_dir} is not a folder")
    for attr in ("init_config", "tokenizer", "init_vision"):
        v = getattr(a, attr, None)
        if v and not Path(v).is_file():
            raise FastVLMError(f"{_flag(attr)} {v}: file not found")
    if a.init_vision and not a.init_config:
        raise FastVLMError("--init-vision only applies with --init-config")
    targets = [t for x in a.lora_targets or [] for t in x.split(",") if t]
    if (a.lora or a.qlora) and not (targets or a.lora_projector or a.lora_vision):
        raise FastVLMError("--lora-targets is empty: name at least one Linear layer to adapt")
    if a.resume and getattr(a, "overwrite", False):
        raise FastVLMError(
            "--resume continues the run in --output, --overwrite starts over: pick one"
        )
    if getattr(a, "force", False) and not a.resume:
        raise FastVLMError("--force only applies with --resume")


def check_model_config(cfg, model_arg: str | None) -> None:
    """Refuse checkpoints that training cannot update (weight-only quantized Linears)."""
    q = getattr(cfg, "quantization", None)
    if q:
        items = q.items() if isinstance(q, dict) else []
        scheme = ", ".join(f"{k}={v}" for k, v in items if k != "version") or str(q)
        raise FastVLMError(
            f"cannot train a quantized model ({model_arg}: {scheme}): use the fp16/fp32 source "
            "it was quantized from (or --qlora, which quantizes the float model itself)"
        )


def check_schedule(a: TrainConfig, total: int) -> None:
    """Checks that need the number of steps (known once the data is loaded); an unset warmup
    becomes DEFAULT_WARMUP steps, or a tenth of a shorter run (the lr must reach --lr). Sets
    `a.warmup`: the loop passes its own copy of the config."""
    if a.warmup is None:
        a.warmup = min(DEFAULT_WARMUP, total // 10)
    if a.warmup > total:
        raise FastVLMError(
            f"--warmup {a.warmup} is longer than the run ({total} steps): lower --warmup or "
            "train longer (--epochs / --max-steps)"
        )
    if a.stop_after and a.stop_after > total:
        raise FastVLMError(
            f"--stop-after {a.stop_after} is past the end of the run ({total} steps)"
        )
