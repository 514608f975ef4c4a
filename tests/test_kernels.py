"""fastvlm.kernels: the C decode kernels against float64 references, the quantized-layer and
FastLinear integrations, and the fallbacks (compile failure, FASTVLM_KERNELS=0). CPU, seconds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from torch import nn

from fastvlm import kernels, quant
from fastvlm.kernels import FastLinear, use_fast_linears
from fastvlm.quant import Int4Linear, Int8Linear, Scheme

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"fastvlm kernels unavailable: {kernels.unavailable_reason()}"
)
ROWS = list(range(1, 10))  # 1..8 are the register-tiled cases, 9 = a block of 8 plus 1


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_int4(g: torch.Generator, m: int, n: int, k: int, group_size: int):
    """x (m, k), nibbles q (n, k), scales s and zeros z (n, k / group_size), drawn in this order."""
    x = torch.randn(m, k, generator=g)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // group_size, generator=g) + 0.01
    z = torch.randn(n, k // group_size, generator=g)
    return x, q, s, z


def dequant_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int):
    """The float64 weight an int4 layer stands for: (q - 8) * scale + zero, per group."""
    rep = lambda t: t.double().repeat_interleave(group_size, 1)  # noqa: E731
    return (q.double() - 8) * rep(s) + rep(z)


# ---------------------------------------------------------------------- kernels vs float64
@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(37, 896), (131, 4864), (13, 44), (5, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fp32_matches_float64(m, n, k, with_bias, isa):
    """`isa`: at M = 2..8 "vnni" runs the AVX-512 tiles where the CPU has AVX-512, "avx2" the
    AVX2 tiles (M = 1 is the same row kernel either way)."""
    g = gen(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    y = kernels.linear_fp32(x, w, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(37, 896), (131, 4864), (13, 44), (9, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_matches_float64(m, n, k, with_bias):
    g = gen(m * 1000 + n + 1)
    x = torch.randn(m, k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) + 0.01
    b = torch.randn(n, generator=g) * 10 if with_bias else None
    ref = (x.double() @ q.double().T) * s.double() + (0 if b is None else b.double())
    assert rel_err(kernels.linear_int8(x, q, s, b), ref) < 1e-5


def int8_act_quant_x(x: torch.Tensor) -> torch.Tensor:
    """x as the int8 act_quant kernel sees it, reproduced bit for bit in fp32: per 64 columns
    d = absmax / 32767, xs = round-half-even(x · (32767 / absmax)), x̂ = d · xs (float64)."""
    m, k = x.shape
    b = x.reshape(m, k // 64, 64)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    xs = torch.round(b * inv)
    assert xs.abs().max() <= 32767
    return (xs.double() * (amax / 32767.0).double()).reshape(m, k)


def int8_act_quant_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-output bound on |y_act_quant - y_exact| (M, N): scale_n · Σ_k |q_k| · d_b(k)/2
    (K % 64 != 0: the kernel is exact, the bound is 0)."""
    m, k = x.shape
    if k % 64:
        return torch.zeros(m, q.shape[0], dtype=torch.float64)
    d = x.reshape(m, k // 64, 64).abs().amax(-1).double() / 32767.0
    return ((d / 2).repeat_interleave(64, 1) @ q.double().abs().T) * s.double()


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(37, 896), (131, 4864), (13, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_act_quant_matches_float64(m, n, k, with_bias, isa):
    """The fast int8 path (x quantized to int16 per 64 columns, _mm256_madd_epi16; at M = 1 with
    `isa` = vnni on an AVX-512 BW + VNNI CPU, _mm512_dpwssd_epi32).
    1) Against float64 math on the same x̂ (reproduced exactly): the exact path's 1e-5.
    2) Against the true float64 result: within the worst-case bound and within 6σ of the error
       model (independent uniform rounding errors, see test_int4_act_quant_matches_float64).
       σ is ~1e-5 of |y| without outliers (~1e-4 for K = 64 with the 20x outlier), ~100x below
       the int8 weight rounding (1/254 of a row's absmax)."""
    g = gen(m * 1000 + n + 3)
    x = torch.randn(m, k, generator=g)
    x[:, 5] *= 20  # an outlier column
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) + 0.01
    b = torch.randn(n, generator=g) * 10 if with_bias else None
    bias = 0 if b is None else b.double()
    y = kernels.linear_int8(x, q, s, b, act_quant=True)
    ref_hat = (int8_act_quant_x(x) @ q.double().T) * s.double() + bias
    assert rel_err(y, ref_hat) < 1e-5
    ref = (x.double() @ q.double().T) * s.double() + bias
    err, scale = (y.double() - ref).abs(), ref.abs().max()
    assert (err <= int8_act_quant_bound(x, q, s) + 1e-5 * scale).all()
    d = x.reshape(m, k // 64, 64).abs().amax(-1).double() / 32767.0
    sigma = ((d**2 / 12).repeat_interleave(64, 1) @ (q.double() ** 2).T).sqrt() * s.double()
    assert (err <= 6 * sigma + 1e-5 * scale).all()


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(37, 512), (131, 4864)])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int4_matches_float64(m, n, k, group_size, with_bias):
    g = gen(m * 1000 + n + group_size)
    x, q, s, z = rand_int4(g, m, n, k, group_size)
    b = torch.randn(n, generator=g) if with_bias else None
    w = dequant_int4(q, s, z, group_size)
    ref = x.double() @ w.T + (0 if b is None else b.double())
    packed = quant.pack_nibbles(q).contiguous()
    assert rel_err(kernels.linear_int4(x, packed, s, z, group_size, b), ref) < 1e-5
    zb = kernels.int4_zb(s, z)  # the cached-offset form the modules use
    assert rel_err(kernels.linear_int4(x, packed, s, None, group_size, b, zb=zb), ref) < 1e-5


def block_absmax(x: torch.Tensor, gs: int) -> torch.Tensor:
    """absmax of the int4 act_quant kernel's x block, per element (M, K). A block is lane u
    (columns 8u..8u+7) of the S chunks of 64 columns that share a weight group (S = G/64, 1 for
    G = 32): 8 columns for G <= 64, 16 for G = 128, 32 for G = 256."""
    m, k = x.shape
    span = max(1, gs // 64)
    b = x.reshape(m, k // (64 * span), span, 8, 8).abs().amax(dim=(2, 4), keepdim=True)
    return b.expand(m, k // (64 * span), span, 8, 8).reshape(m, k)


def act_quant_d(x: torch.Tensor, gs: int) -> torch.Tensor:
    """The block step d = absmax / 127 per element (M, K), float64."""
    return block_absmax(x, gs).double() / 127.0


def act_quant_x(x: torch.Tensor, gs: int) -> torch.Tensor:
    """x as the int4 act_quant kernel sees it, reproduced bit for bit in fp32:
    xq = round-half-even(x · (127 / absmax)), x̂ = (absmax / 127) · xq (float64 out)."""
    amax = block_absmax(x, gs)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv)  # fp32 multiply, half-to-even: the kernel's cvtps_epi32
    assert xq.abs().max() <= 127
    return xq.double() * (amax / 127.0).double()


def act_quant_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, gs: int) -> torch.Tensor:
    """Per-output bound on |y_act_quant - y_exact| (M, N), float64: the kernel uses exact sums
    of x for the zb term, so the error is Σ_k q_k·s_g(k)·(x̂_k - x_k) and |x̂_k - x_k| ≤ d_k/2."""
    half_step = act_quant_d(x, gs) / 2  # (M, K)
    qs = q.double() * s.double().repeat_interleave(gs, 1)  # (N, K), ≥ 0
    return half_step @ qs.T


def act_quant_sigma(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, gs: int) -> torch.Tensor:
    """Standard deviation of that error when the rounding errors x̂_k - x_k are independent
    and uniform on ±d_k/2 (variance d_k²/12): sqrt(Σ_k (q_k·s_g(k))² · d_k² / 12)."""
    var = act_quant_d(x, gs) ** 2 / 12
    qs2 = (q.double() * s.double().repeat_interleave(gs, 1)) ** 2
    return (var @ qs2.T).sqrt()


@pytest.fixture(params=["vnni", "avx2"])
def isa(request):
    """Both builds of the int4 act_quant tiles (VNNI is skipped where the CPU lacks it). Where
    the CPU has AVX-512 (F, BW, VNNI), "vnni" also runs the AVX-512 kernels: fp32 at M = 2..8,
    int8 and int4 (G >= 64) act_quant at M = 1."""
    want = request.param == "vnni"
    if kernels.use_vnni(want) != want:
        pytest.skip("CPU or compiler without AVX-VNNI")
    yield request.param
    kernels.use_vnni(True)


@needs_kernels
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", [(37, 512), (131, 4864), (48, 896)])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int4_act_quant_matches_float64(m, n, k, group_size, with_bias, isa):
    """The fast int4 path (x quantized to int8 in blocks of 8-32 columns, see block_absmax;
    integer dot products).
    1) Against float64 math on the same quantized x̂ (reproduced exactly in Python): only fp32
       accumulation error is left, so the exact path's 1e-5 holds.
    2) Against the true float64 result: within the worst-case x-quantization bound (+1e-5
       relative for fp32 accumulation), and — the tolerance that has teeth, since the worst
       case adds every rounding error with the same sign — within 6 standard deviations of the
       error model (independent uniform rounding errors; a sum of bounded independent terms is
       sub-Gaussian, so a 6σ miss is a real bug, not bad luck)."""
    if k % group_size:
        pytest.skip("K not a multiple of the group size")
    g = gen(m * 1000 + n + group_size + 5)
    x, q, s, z = rand_int4(g, m, n, k, group_size)
    x[:, 7] *= 20  # an outlier column, as in real activations: its block gets a coarse step
    b = torch.randn(n, generator=g) if with_bias else None
    w = dequant_int4(q, s, z, group_size)
    bias = 0 if b is None else b.double()
    packed = quant.pack_nibbles(q).contiguous()
    zb = kernels.int4_zb(s, z)
    y = kernels.linear_int4(x, packed, s, None, group_size, b, zb=zb, act_quant=True)
    # 1) same x̂, float64: the zb term uses the exact x sums, so split w = q·s + zb
    qs = q.double() * s.double().repeat_interleave(group_size, 1)
    zbk = zb.double().repeat_interleave(group_size, 1)
    ref_hat = act_quant_x(x, group_size) @ qs.T + x.double() @ zbk.T + bias
    assert rel_err(y, ref_hat) < 1e-5
    # 2) the true result, within the bound
    ref = x.double() @ w.T + bias
    bound = act_quant_bound(x, q, s, group_size)
    scale = ref.abs().max()
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-5 * scale).all()
    assert (err <= 6 * act_quant_sigma(x, q, s, group_size) + 1e-5 * scale).all()


@needs_kernels
def test_int4_act_quant_vnni_and_avx2_agree_exactly():
    """Both builds compute the same integer dot products, then the same fp32 operations — at
    M = 1 on an AVX-512 VNNI CPU the "vnni" side is the AVX-512 row kernel, whose fp32 sums run
    in another order (so: equal to fp32 rounding there, bit-identical otherwise)."""
    x, q, s, z = rand_int4(gen(12), 5, 64, 896, 128)
    packed = quant.pack_nibbles(q).contiguous()
    ys = []
    try:
        for want in (True, False):
            kernels.use_vnni(want)
            ys.append(
                [kernels.linear_int4(x[:m], packed, s, z, 128, act_quant=True) for m in (1, 5)]
            )
    finally:
        kernels.use_vnni(True)  # the default, also when an assertion above failed
    (a1, a5), (b1, b5) = ys
    assert torch.equal(a5, b5)
    torch.testing.assert_close(a1, b1, rtol=1e-5, atol=1e-5 * b1.abs().max().item())


@needs_kernels
def test_int4_act_quant_falls_back_to_exact_when_k_not_multiple_of_64():
    x, q, s, z = rand_int4(gen(11), 3, 16, 96, 32)
    packed = quant.pack_nibbles(q).contiguous()
    exact = kernels.linear_int4(x, packed, s, z, 32)
    torch.testing.assert_close(kernels.linear_int4(x, packed, s, z, 32, act_quant=True), exact,
                               rtol=0, atol=0)  # fmt: skip


@needs_kernels
def test_large_m_uses_row_blocks():
    g = gen(7)
    x, w = torch.randn(67, 96, generator=g), torch.randn(40, 96, generator=g)
    assert rel_err(kernels.linear_fp32(x, w), x.double() @ w.double().T) < 1e-5
    assert kernels.linear_fp32(x[:0], w).shape == (0, 40)


@needs_kernels
def test_misuse_raises_value_error():
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    with pytest.raises(ValueError, match="x must be"):
        kernels.linear_fp32(x.double(), w)
    with pytest.raises(ValueError, match="x must be"):
        kernels.linear_fp32(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear_fp32(x, torch.randn(64, 8).T)
    with pytest.raises(ValueError, match="bias"):
        kernels.linear_fp32(x, w, torch.randn(7))
    q = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="scales"):
        kernels.linear_int8(x, q, torch.ones(8, dtype=torch.float16))
    p = torch.zeros(8, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size"):
        kernels.linear_int4(x, p, torch.ones(8, 1), torch.zeros(8, 1), 48)
    with pytest.raises(ValueError, match="scales"):
        kernels.linear_int4(x, p, torch.ones(8, 1), torch.zeros(8, 1), 32)


# ---------------------------------------------------------------------- quantized layers
def spy(monkeypatch, name: str) -> list[int]:
    """Record M of each call of kernels.<name> (modules call it through the module)."""
    calls, real = [], getattr(kernels, name)

    def wrapped(x, m, *a, **kw):
        calls.append(m)
        return real(x, m, *a, **kw)

    monkeypatch.setattr(kernels, name, wrapped)
    return calls


@needs_kernels
@pytest.mark.parametrize("m", [1, 4, 8, 12])  # M >= prefill.MIN_ROWS: test_fast_cpu.py
@pytest.mark.parametrize("k", [96, 256])  # 96: K % 64 != 0, the exact path even with act_quant
def test_int8_linear_uses_kernel_and_matches_previous_paths(monkeypatch, m, k):
    lin = nn.Linear(k, 80)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(m, 1, k)
    ref = layer._dequant(x.reshape(-1, k)).reshape(m, 1, 80)  # fp32 dequantize + F.linear
    calls = spy(monkeypatch, "_run_i8")
    assert Int8Linear.act_quant  # the default: int16 activations (fast path)
    y = layer(x)
    assert calls == [m]
    bound = int8_act_quant_bound(x.reshape(-1, k), layer.qweight, layer.scales)
    err = (y.reshape(-1, 80).double() - ref.reshape(-1, 80).double()).abs()
    assert (err <= bound + 1e-5 * ref.abs().max()).all()
    layer.act_quant = False  # exact fp32 math in the kernel
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    del layer.act_quant
    if quant.HAS_INT8_KERNEL:  # the torch int8 op in bf16, the previous default CPU path
        old = layer._kernel(x.reshape(-1, k)).reshape(m, 1, 80)
        torch.testing.assert_close(y, old, rtol=2e-2, atol=2e-2)


@needs_kernels
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 3, 8, 15])  # M >= prefill.MIN_ROWS: test_fast_cpu.py
def test_int4_linear_uses_kernel_and_matches_previous_paths(monkeypatch, group_size, m):
    lin = nn.Linear(512, 48)
    layer = Int4Linear.from_linear(lin, Scheme(4, group_size, False))
    layer.repack()  # with the kernels: the portable nibble form stays, no tinygemm copy
    assert layer.qweight.shape == (48, 256) and not layer.packed.numel()
    x = torch.randn(m, 512)
    ref = layer._dequant(x)
    calls = spy(monkeypatch, "_run_i4")
    assert Int4Linear.act_quant  # the default: int8 activations (fast path)
    y = layer(x)
    assert calls == [m]
    q = quant.unpack_nibbles(layer.qweight)
    bound = act_quant_bound(x, q, layer.scales, group_size) + 1e-5 * ref.abs().max()
    assert ((y.double() - ref.double()).abs() <= bound).all()
    layer.act_quant = False  # exact fp32 math in the kernel
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    del layer.act_quant
    # bf16 input: computed in fp32 by the kernel, returned as bf16
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, rtol=3e-2, atol=3e-2)
    if quant.HAS_INT4_KERNEL:  # tinygemm in bf16, the previous default CPU path
        monkeypatch.setattr(kernels, "_enabled", False)
        old = Int4Linear.from_linear(lin, Scheme(4, group_size, False))
        old.repack()
        assert old.packed.numel()
        torch.testing.assert_close(y, old(x), rtol=3e-2, atol=3e-2)


@needs_kernels
def test_quant_cache_follows_in_place_updates():
    layer = Int8Linear.from_linear(nn.Linear(64, 16))
    x = torch.randn(2, 64)
    y1 = layer(x)
    with torch.no_grad():
        layer.scales.mul_(2)
    torch.testing.assert_close(layer(x), 2 * y1 - layer.bias, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_quantized_model_with_kernel_matches_dequant_path(monkeypatch):
    model = make_tiny_model(vocab_size=304)
    quant.quantize_model(model, "int4-g32")
    ids = torch.randint(4, 300, (1, 6))
    head = model.lm_head
    with torch.no_grad():
        hidden = model.language_model.embed_tokens(ids)
        rows = [hidden[:, i : i + 1] for i in range(6)]  # decode-shaped (B, 1, K)
        fast = [head(r) for r in rows]  # act_quant (int8 activations)
        monkeypatch.setattr(Int4Linear, "act_quant", False)
        exact = [head(r) for r in rows]
        monkeypatch.setattr(kernels, "_enabled", False)
        slow = [head._dequant(r[0])[None] for r in rows]
    q = quant.unpack_nibbles(head.qweight)
    for r, a, e, b in zip(rows, fast, exact, slow, strict=True):
        torch.testing.assert_close(e, b, rtol=1e-5, atol=1e-5)
        bound = act_quant_bound(r[0], q, head.scales, 32) + 1e-5 * b.abs().max()
        assert ((a[0].double() - b[0].double()).abs() <= bound).all()


# ---------------------------------------------------------------------- FastLinear
@needs_kernels
def test_fast_linear_matches_and_handles_shapes(monkeypatch):
    lin = nn.Linear(72, 40)
    fast = FastLinear.from_linear(lin)
    assert fast.weight is lin.weight and fast.bias is lin.bias
    assert set(fast.state_dict()) == {"weight", "bias"}
    calls = spy(monkeypatch, "_run_f32")
    with torch.no_grad():
        for shape in [(72,), (1, 72), (3, 1, 72), (8, 72), (2, 9, 72)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 1, 3, 8]  # 18 rows > MAX_M: F.linear
    x = torch.randn(2, 72, requires_grad=True)  # autograd: the torch path, gradients flow
    fast(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert calls == [1, 1, 3, 8]


@needs_kernels
def test_use_fast_linears_keeps_logits_and_tying(monkeypatch):
    from fastvlm.engine.generate import generate_step
    from fastvlm.engine.sampling import SamplingParams

    model = make_tiny_model(vocab_size=304)
    g = gen(3)
    ids = torch.randint(4, 300, (1, 6), generator=g)  # 6 rows: the kernel handles prefill too
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with torch.no_grad():
        before = model(ids)
    toks_before = list(generate_step(model, ids[0].tolist(), None, params))
    n_layers = len(model.language_model.layers)
    assert use_fast_linears(model) == 7 * n_layers + 1  # q k v o gate up down + lm_head
    q_proj = model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj) is FastLinear and type(model.lm_head) is FastLinear
    assert model.lm_head.weight is model.language_model.embed_tokens.weight  # still tied
    assert type(model.mm_projector[0]) is nn.Linear  # only the decoder and lm_head
    assert use_fast_linears(model) == 0  # idempotent
    calls = spy(monkeypatch, "_run_f32")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert calls and max(calls) == 6
    calls.clear()
    assert list(generate_step(model, ids[0].tolist(), None, params)) == toks_before
    assert calls.count(1) >= 11 * (7 * n_layers + 1)  # every decode step went through it
    # quantizing a model that already has FastLinears still swaps them
    summary = quant.quantize_model(model, "int8")
    assert summary.components["llm"].layers == 7 * n_layers + 1
    assert type(model.lm_head) is Int8Linear and type(q_proj) is FastLinear


# ---------------------------------------------------------------------- fallbacks
@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A kernels module state that re-checks everything, with an empty cache dir."""
    monkeypatch.setenv("FASTVLM_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTVLM_KERNELS", raising=False)
    kernels._reset()
    yield tmp_path / "cache"
    monkeypatch.undo()
    kernels._reset()


def test_compile_failure_falls_back(monkeypatch, fresh_kernels):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert not kernels.available()
    assert "compile failed" in kernels.unavailable_reason()
    assert not list(fresh_kernels.glob("*.so"))  # nothing half-written left behind
    with pytest.raises(RuntimeError, match="not available"):
        kernels.linear_fp32(torch.randn(1, 8), torch.randn(4, 8))
    lin = nn.Linear(32, 16)
    fast, q8 = FastLinear.from_linear(lin), Int8Linear.from_linear(lin)
    q4 = Int4Linear.from_linear(lin, Scheme(4, 32, False))
    q4.repack()
    x = torch.randn(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), lin(x))
        torch.testing.assert_close(q8(x), q8._dequant(x), rtol=2e-2, atol=2e-2)
        if quant.HAS_INT4_KERNEL:
            assert q4.packed.numel()  # torch's int4 layout again
        torch.testing.assert_close(q4(x), lin(x), rtol=0.1, atol=0.1)


def test_missing_compiler_and_env_switch(monkeypatch, fresh_kernels):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not kernels.available() and "no C compiler" in kernels.unavailable_reason()
    kernels._reset()
    monkeypatch.setenv("FASTVLM_KERNELS", "0")
    assert not kernels.available() and "FASTVLM_KERNELS=0" in kernels.unavailable_reason()


@needs_kernels
def test_builds_into_cache_dir_once(fresh_kernels):
    assert kernels.available()
    libs = list(fresh_kernels.glob("gemv-*.so"))
    assert len(libs) == 1 and not list(fresh_kernels.glob(".build-*"))
    x, w = torch.randn(2, 16), torch.randn(3, 16)
    torch.testing.assert_close(kernels.linear_fp32(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    mtime = libs[0].stat().st_mtime_ns
    kernels._reset()
    assert kernels.available() and libs[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_tracing_never_records_a_kernel_call():
    """ONNX export traces with TorchScript: a ctypes call would be traced as an uninitialised
    `empty` (found when exporting a model whose Linears the engine had swapped)."""
    import fastvlm.kernels as K

    if not K.available():
        pytest.skip(K.unavailable_reason())
    lin = torch.nn.Linear(64, 48)
    fast = K.FastLinear.from_linear(lin)
    x = torch.randn(1, 64)
    traced = torch.jit.trace(fast, x)
    x2 = torch.randn(1, 64)
    torch.testing.assert_close(traced(x2), lin(x2))
