"""Prefill-shaped quantized calls take the GEMM path (kernels/prefill.py), not the decode
kernels; the bf16 vision / prefill option (fast_cpu.py) keeps output quality on the demo model's
held-out scenes. Structural and quality checks only: no timing asserts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastvlm
from fastvlm import fast_cpu, kernels, quant
from fastvlm.errors import ConfigError
from fastvlm.kernels import FastLinear, prefill
from fastvlm.model.fastvithd import FastViTHD
from fastvlm.quant import Int4Linear, Int8Linear, Scheme

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="fastvlm kernels unavailable")


def _layer(kind: str, n: int, k: int, seed: int = 0, repack: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    if kind == "int8":
        m = Int8Linear.from_linear(lin)
    else:
        m = Int4Linear.from_linear(lin, Scheme(bits=4, group_size=64))
    if repack:  # without the C kernels an Int4Linear repacks into torch's layout
        m.repack()
    return m


class _Spy:
    """Counts calls of the decode kernels' module entry points."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for name in ("_run_i8", "_run_i4"):
            real = getattr(kernels, name)

            def wrapped(*a, _real=real, **kw):
                self.calls += 1
                return _real(*a, **kw)

            monkeypatch.setattr(kernels, name, wrapped)


# ---------------------------------------------------------------------- int8 / int4 prefill path
@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 16), (1, 64), (2, 150), (1, 281)])
def test_prefill_shaped_quant_call_takes_the_gemm_path(monkeypatch, kind, shape):
    """A prompt-sized call (M >= MIN_ROWS rows) never reaches the decode kernels, whose
    8-rows-at-a-time tiles re-stream the weight M/8 times (the int8 prefill pathology)."""
    m = _layer(kind, 192, 256)
    spy = _Spy(monkeypatch)
    x = torch.randn(*shape, 256)
    ref = nn.functional.linear(x, m.dequantized_weight(), m.bias)
    for dt in (torch.float32, torch.bfloat16):
        m.prefill_dtype = dt
        with torch.no_grad():
            y = m(x)
        assert y.shape == ref.shape and y.dtype == x.dtype
        tol = 1e-5 if dt == torch.float32 else 2e-2  # bf16: x and the output rounded to 8 bits
        assert ((y - ref).norm() / ref.norm()).item() < tol, dt
    assert spy.calls == 0


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 4, 8, prefill.MIN_ROWS - 1])
def test_decode_shaped_quant_call_keeps_the_decode_kernels(monkeypatch, kind, rows):
    m = _layer(kind, 64, 128, seed=1)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        m(torch.randn(1, rows, 128))
    assert spy.calls == 1


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prefill_gemm_dequantizes_in_bounded_chunks(monkeypatch, kind):
    """No float copy of a whole layer: at most CHUNK_ELEMS weight elements at a time, and the
    chunked result equals the one-chunk result."""
    m = _layer(kind, 96, 128, seed=2, repack=False)  # the portable form, kernels or not
    x = torch.randn(40, 128)
    m.prefill_dtype = torch.float32
    with torch.no_grad():
        whole = m(x)
        monkeypatch.setattr(prefill, "CHUNK_ELEMS", 16 * 128)  # 16 rows per chunk: 6 chunks
        seen = []
        real = prefill.F.linear

        def spy(a, w, b=None):
            seen.append(w.shape[0])
            return real(a, w, b)

        monkeypatch.setattr(prefill.F, "linear", spy)
        chunked = m(x)
    assert seen == [16] * 6
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_quant_prefill_default_dtype_follows_the_cpu(monkeypatch):
    m = _layer("int8", 32, 64)
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(prefill, "native_bf16", lambda n=native: n)
        assert prefill.compute_dtype(m) == want
    m.prefill_dtype = torch.float32
    assert prefill.compute_dtype(m) == torch.float32


def test_graph_capture_keeps_the_module_path(monkeypatch):
    m = _layer("int8", 32, 64)
    monkeypatch.setattr(prefill.capture, "graph_capture", lambda: True)
    assert not prefill.takes_gemm(m, torch.randn(64, 64))
    monkeypatch.setattr(prefill.capture, "graph_capture", lambda: False)
    assert prefill.takes_gemm(m, torch.randn(64, 64))
    assert not prefill.takes_gemm(m, torch.randn(prefill.MIN_ROWS - 1, 64))


# ---------------------------------------------------------------------- FastLinear prefill
@pytest.mark.parametrize("rows", [prefill.MIN_ROWS, 100])
def test_fastlinear_bf16_prefill_and_fp32_decode(rows):
    torch.manual_seed(0)
    lin = FastLinear.from_linear(nn.Linear(96, 80))
    x = torch.randn(rows, 96)
    with torch.no_grad():
        ref = nn.functional.linear(x, lin.weight, lin.bias)
        lin.prefill_dtype = torch.bfloat16
        y = lin(x)
        assert y.dtype == torch.float32
        assert 0 < ((y - ref).norm() / ref.norm()).item() < 2e-2  # really bf16, still close
        small = torch.randn(2, 96)  # decode rows stay exact fp32
        torch.testing.assert_close(lin(small), nn.functional.linear(small, lin.weight, lin.bias))


# ---------------------------------------------------------------------- the option
@pytest.mark.parametrize("bad", ["fp16", "int8", "bfloat", ""])
def test_bad_compute_dtype_is_a_config_error(bad):
    if bad == "":
        assert fast_cpu.resolve(bad) == torch.float32  # empty = the default
        return
    with pytest.raises(ConfigError, match="fp32"):
        fast_cpu.resolve(bad, "vision dtype")
    with pytest.raises(ConfigError):
        fastvlm.load(vision_dtype=bad)


def test_auto_follows_the_cpu(monkeypatch):
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(fast_cpu, "native_bf16", lambda n=native: n)
        assert fast_cpu.resolve("auto") == want


@pytest.fixture(scope="module")
def demo_pair():
    return fastvlm.load(), fastvlm.load(vision_dtype="bf16", prefill_dtype="bf16")


def test_prepare_is_a_swap_not_a_rewrite(demo_pair):
    a, b = demo_pair
    assert fast_cpu.describe(a.model) == {"vision": "fp32", "prefill": "fp32"}
    assert fast_cpu.describe(b.model) == {"vision": "bf16", "prefill": "bf16"}
    assert isinstance(b.model.vision_tower, (FastViTHD, fast_cpu.BF16Tower))
    assert list(a.model.state_dict()) == list(b.model.state_dict())  # same names and keys
    convs = [m for m in b.model.vision_tower.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.dtype == torch.bfloat16 for c in convs)
    assert b.model.lm_head.weight.dtype == torch.float32  # the decoder stays fp32


def _scenes(n: int):
    from fastvlm.train import shapes

    out = []
    for i in range(n):
        img, _ = shapes.draw_scene(shapes.image_rng(1000, i))  # held-out seed
        out.append(img)
    return out


def test_bf16_vision_embeddings_match_fp32(demo_pair):
    a, b = demo_pair
    cos = []
    with torch.inference_mode():
        px = a.processor.pixels(_scenes(12))
        ea, eb = a.model.embed_images(px), b.model.embed_images(px)
    assert eb.dtype == torch.float32 and ea.shape == eb.shape
    for x, y in zip(ea, eb, strict=True):
        cos.append(nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item())
    assert min(cos) >= 0.999, cos
    assert not torch.equal(ea, eb)  # the bf16 path really ran


def test_bf16_greedy_agreement_on_held_out_scenes(demo_pair):
    from fastvlm.bench.torch_engine import greedy_agreement

    a, b = demo_pair
    assert greedy_agreement(a.model, b.model, a.processor, 20, 32) >= 0.98


def test_quantized_bf16_prefill_agrees_with_exact_prefill():
    """int8 decoder: the bf16 GEMM prefill vs exact fp32 prefill, greedy on held-out scenes."""
    from fastvlm.bench.torch_engine import greedy_agreement

    exact, fast = fastvlm.load(), fastvlm.load()
    for vlm, dt in ((exact, "fp32"), (fast, "bf16")):
        quant.quantize_model(vlm.model, "int8")
        fast_cpu.prepare_cpu(vlm.model, "fp32", dt)
    assert fast_cpu.describe(fast.model)["prefill"] == "bf16"
    assert greedy_agreement(exact.model, fast.model, exact.processor, 20, 32) >= 0.98


def test_bf16_tower_fuses_conv_gelu_and_swaps_back(demo_pair):
    """conv → GELU pairs run fused in the bf16 tower; `to_fp32` restores the plain classes."""
    from fastvlm.model.fastvithd import ConvFFN, MobileOneBlock

    b = demo_pair[1]
    kinds = {type(m).__name__ for m in b.model.vision_tower.modules()}
    assert {"_FusedConvFFN", "_FusedMobileOne"} <= kinds
    tower = fastvlm.load(vision_dtype="bf16").model.vision_tower
    plain = type(fastvlm.load().model.vision_tower)  # device.CPUFastViTHD on CPU
    tower.to_fp32()
    assert type(tower) is plain
    for m in tower.modules():
        assert type(m).__name__ not in ("_FusedConvFFN", "_FusedMobileOne")
        if isinstance(m, (ConvFFN, MobileOneBlock)):
            assert all(p.dtype == torch.float32 for p in m.parameters())


def test_prepare_leaves_a_bf16_model_alone():
    vlm = fastvlm.load(dtype="bfloat16", vision_dtype="bf16", prefill_dtype="bf16")
    assert fast_cpu.describe(vlm.model) == {"vision": "bfloat16", "prefill": "bfloat16"}
    assert not isinstance(vlm.model.vision_tower, fast_cpu.BF16Tower)
    assert vlm.describe(_scenes(1)[0], max_tokens=4)  # still runs


@pytest.mark.parametrize("argv", [[], ["--vision-dtype", "bf16"], ["--prefill-dtype", "auto"],
                                  ["--vision-dtype", "auto", "--prefill-dtype", "fp32"]])  # fmt: skip
def test_every_front_end_passes_the_compute_dtypes(argv):
    """The CLI's load kwargs, `fastvlm serve`'s config and `fastvlm bench` all carry the flags
    (a flag that parses but is dropped would silently run fp32)."""
    from fastvlm.bench.cli import build_parser as bench_parser
    from fastvlm.cli.args import load_kwargs
    from fastvlm.server.app import build_parser as serve_parser
    from fastvlm.server.app import config_from_args

    want = {"vision_dtype": "fp32", "prefill_dtype": None}
    for i in range(0, len(argv), 2):
        want[argv[i][2:].replace("-", "_")] = argv[i + 1]
    kw = load_kwargs(fastvlm.cli.build_parser().parse_args(["describe", "x.png", *argv]))
    assert kw.get("vision_dtype") == want["vision_dtype"]
    assert kw.get("prefill_dtype") == want["prefill_dtype"]
    cfg = config_from_args(serve_parser().parse_args(argv))
    assert (cfg.vision_dtype, cfg.prefill_dtype) == (want["vision_dtype"], want["prefill_dtype"])
    b = bench_parser().parse_args(argv)
    assert (b.vision_dtype, b.prefill_dtype) == (want["vision_dtype"], want["prefill_dtype"])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prefill_gemm_keeps_gradients_exact(kind):
    """Through a frozen quantized layer (LoRA-style training), x's gradient is exact fp32."""
    m = _layer(kind, 48, 128, seed=3, repack=False)
    m.prefill_dtype = torch.bfloat16
    x = torch.randn(32, 128, requires_grad=True)
    m(x).sum().backward()
    want = m.dequantized_weight().sum(0).expand(32, -1)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)
