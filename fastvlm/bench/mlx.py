"""The mlx backend and mlx-vlm itself, on the same weights, prompt and image as the torch rows.

`bench_mlx` writes the weights as an MLX folder (`--quant` fp32 | int8 | int4 → float, 8-bit,
4-bit affine) and times fastvlm's mlx backend. `bench_mlx_vlm` runs mlx-vlm's own
`stream_generate` on that folder in a child process (its own allocator and MLX state), fed the
same token ids and pixels in mlx-vlm's convention (one image token per image).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..mlx_format import save_mlx
from .measure import peak_rss_mb
from .workload import PROMPT_TEXT, prompt_ids, random_image

QUANT_BITS = {"fp32": None, "none": None, "float32": None, "int8": 8, "int4": 4}


def _bits(quant: str) -> int | None:
    if quant not in QUANT_BITS:
        raise ConfigError(f"--quant {quant!r} has no mlx counterpart: use fp32, int8 or int4")
    return QUANT_BITS[quant]


def _write(model, folder: Path, bits: int | None, src: Path | None = None) -> None:
    """`model`'s weights as an MLX folder, plus the source model's tokenizer.json if any."""
    save_mlx(dict(model.state_dict()), model.config, folder, q_bits=bits)
    if src is not None and (Path(src) / "tokenizer.json").exists():
        (folder / "tokenizer.json").write_bytes((Path(src) / "tokenizer.json").read_bytes())


def bench_mlx(model, processor, args, quant: str) -> dict[str, Any]:
    """The mlx backend on `model`'s weights (fp32 on MLX's CPU build; the stored precision on
    Apple silicon GPUs)."""
    from ..backends.mlx import open_mlx
    from ..engine.sampling import SamplingParams

    bits = _bits(quant)
    out: dict[str, Any] = {"name": f"mlx {'fp32' if bits is None else f'int{bits}'}"}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _write(model, Path(tmp), bits)
        out["convert_s"] = time.perf_counter() - t0
        be = open_mlx(Path(tmp))
        size = model.config.vision.image_size
        px = processor.pixels([random_image(size, seed=1)])
        ids = prompt_ids(model.config, seed=2)
        list(be.submit(ids[: PROMPT_TEXT[0]], None, SamplingParams(max_tokens=2)))  # warm-up
        p = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        gen = be.submit(ids, px, p)
        list(gen)
        st = gen.stats
        out["device"] = be.device
        be.close()
    out["vision_s"] = st.vision_s
    out["ttft_s"] = st.prefill_s
    out["prefill_s"] = st.prefill_s - st.vision_s
    out["decode_tok_s"] = st.decode_tps
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def bench_mlx_vlm(model, args, src: Path | None = None) -> list[dict[str, Any]]:
    """mlx-vlm's `stream_generate` on the same weights (float MLX folder), in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        _write(model, Path(tmp), None, src)
        (Path(tmp) / "bench_spec.json").write_text(json.dumps({"max_tokens": args.max_tokens}))
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "fastvlm.bench", "--mlx-vlm-worker", tmp]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"mlx-vlm run failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["name"] = "mlx-vlm"
    return [r]


def _processor(folder: Path, eos_ids: list[int]):
    """What `stream_generate` reads from a processor: a tokenizer with `stopping_criteria` and a
    streaming `detokenizer`, built from the folder's tokenizer.json (or a stand-in vocabulary
    for random-weight shapes, whose text is meaningless anyway)."""
    from types import SimpleNamespace

    from mlx_vlm.tokenizer_utils import NaiveStreamingDetokenizer
    from mlx_vlm.utils import StoppingCriteria
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path = folder / "tokenizer.json"
    if path.exists():
        raw = Tokenizer.from_file(str(path))
    else:
        raw = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    tok.stopping_criteria = StoppingCriteria(eos_ids, tok)
    return SimpleNamespace(tokenizer=tok, detokenizer=NaiveStreamingDetokenizer(tok))


def mlx_vlm_worker(folder: str) -> int:
    """Child of `bench_mlx_vlm`: time mlx-vlm's own generation loop, print one JSON line."""
    try:
        import mlx.core as mx
        import mlx_vlm
        from mlx_vlm import stream_generate
    except ImportError as e:
        print(f"--compare mlx-vlm needs mlx and mlx-vlm ({e}): pip install 'fastvlm[mlx]'",
              file=sys.stderr)  # fmt: skip
        return 2
    import torch

    from ..backends.mlx_load import load_mlx_model

    spec = json.loads((Path(folder) / "bench_spec.json").read_text())
    # mlx-vlm's Model and weight loader; our loader only sets the tower shape it hard-codes.
    model, cfg = load_mlx_model(Path(folder))
    processor = _processor(Path(folder), [])  # no EOS: a fixed token count, as our ignore_eos rows
    size = cfg.vision.image_size
    px = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    pixels = mx.array(px.numpy())
    ours = prompt_ids(cfg, seed=2)
    # mlx-vlm's convention: one image token per image, replaced by all of its feature rows
    ids = ours[: PROMPT_TEXT[0]] + [cfg.image_token_id] + ours[-PROMPT_TEXT[1] :]
    input_ids = mx.array([ids])
    out: dict[str, Any] = {"version": getattr(mlx_vlm, "__version__", "?"), "mlx": mx.__version__}
    t0 = time.perf_counter()
    _, feats, _ = model.vision_tower(pixels.transpose(0, 2, 3, 1))
    mx.eval(model.mm_projector(feats.reshape(1, -1, feats.shape[-1])))
    out["vision_s"] = time.perf_counter() - t0

    def run(n: int) -> tuple[float, float, int, Any]:
        t, first, k, last = time.perf_counter(), None, 0, None
        for last in stream_generate(
            model, processor, "", input_ids=input_ids, pixel_values=pixels,
            mask=mx.ones_like(input_ids), max_tokens=n, temperature=0.0,
        ):  # fmt: skip
            k += 1
            if first is None:
                first = time.perf_counter() - t
        return first or 0.0, time.perf_counter() - t, k, last

    run(2)  # warm-up
    n = spec["max_tokens"]
    ttft, total, k, last = run(n)
    out["ttft_s"] = ttft
    out["decode_tok_s"] = (k - 1) / (total - ttft) if k > 1 and total > ttft else 0.0
    out["mlx_vlm_generation_tps"] = getattr(last, "generation_tps", 0.0)
    out["tokens"] = k
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))
    return 0
