"""Shared fixtures: tiny random FastVLM configs built in code (CPU, milliseconds), a small
byte-level tokenizer, and the committed golden fixtures under tests/fixtures/."""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
from pathlib import Path

import pytest
import torch

from fastvlm.config import FastVLMConfig, TextConfig, VisionConfig
from fastvlm.model.fastvlm import FastVLMModel
from fastvlm.weights import save_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_config(**kw) -> FastVLMConfig:
    vision = VisionConfig(layers=(1, 1, 1, 1, 1), embed_dims=(8, 16, 32, 64, 128), image_size=128)
    text = TextConfig(
        vocab_size=kw.pop("vocab_size", 300),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=kw.pop("tie", True),
        max_position_embeddings=512,
        rope_theta=1e6,
        eos_token_id=2,
    )
    return FastVLMConfig(vision=vision, text=text, image_token_id=kw.pop("image_token_id", 3), **kw)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every parameter and BN statistic matter (no 1e-5 layer scales, no unit BN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + ("weight" in name))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def make_tiny_model(seed: int = 0, **kw) -> FastVLMModel:
    torch.manual_seed(seed)
    return randomize(FastVLMModel(tiny_config(**kw)), seed)


def random_prompt(cfg, n: int, seed: int, image: bool = False) -> list[int]:
    """`n` random ordinary token ids (seeded); with `image`, one image's placeholders after two."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, cfg.text.vocab_size, (n,), generator=g).tolist()
    if not image:
        return text
    return text[:2] + [cfg.image_token_id] * cfg.num_image_tokens + text[2:]


def random_pixels(seed: int) -> torch.Tensor:
    """One seeded random 128² image tensor (the tiny configs' resolution)."""
    return torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def tokenizer():
    from fastvlm.train.tokenizer_build import build_tokenizer

    corpus = [
        "Describe this image. a small red circle on the left and a large blue star on the right.",
        "How many shapes are there? What color is the square? héllo wörld ✓ 🙂 日本語",
    ] * 20
    return build_tokenizer(corpus, vocab_size=300)


@pytest.fixture
def tiny_dir(tmp_path, tokenizer) -> Path:
    """A tiny random model saved in our format with a tokenizer."""
    model = make_tiny_model(vocab_size=tokenizer.get_vocab_size())
    save_checkpoint(model.state_dict(), model.config, tmp_path / "tiny", "fastvlm")
    tokenizer.save(str(tmp_path / "tiny" / "tokenizer.json"))
    return tmp_path / "tiny"


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def demo_onnx_export(tmp_path_factory):
    """`export(preset)`: the embedded demo model exported to ONNX (no parity run), built once per
    session and preset, shared by every test that needs an export folder."""
    if not (has_module("onnx") and has_module("onnxruntime")):
        pytest.skip("onnx/onnxruntime missing")
    import fastvlm
    from fastvlm.export.onnx import export_onnx

    demo, root, built = fastvlm.load(engine="reference"), tmp_path_factory.mktemp("onnx"), {}

    def export(preset: str = "quality") -> Path:
        if preset not in built:
            res = export_onnx(demo.model, root / preset, preset, demo.tokenizer, parity=False,
                              log=lambda *_: None)  # fmt: skip
            built[preset] = res.out
        return built[preset]

    return export


# ---------------------------------------------------------------------- network guard
def is_loopback(host) -> bool:
    """127.0.0.0/8 and ::1 in any spelling (127.1, 2130706433, 0x7f000001, [::1], localhost)."""
    h = str(host).strip("[]").split("%", 1)[0]
    if h in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        try:
            return socket.inet_aton(h)[0] == 127
        except OSError:
            return False


def guard_network(mp: pytest.MonkeyPatch, violations: list[str]) -> None:
    """Patch DNS and connect (via `mp`) so that any lookup or connection outside loopback is
    recorded in `violations` and fails, instead of sending a packet anywhere."""
    real_gai, real_connect, real_connect_ex = (
        socket.getaddrinfo,
        socket.socket.connect,
        socket.socket.connect_ex,
    )

    def gai(host, *a, **k):
        if host is None or is_loopback(host):
            return real_gai(host, *a, **k)
        violations.append(f"resolve {host}")
        raise socket.gaierror(socket.EAI_NONAME, f"netguard: no DNS in tests ({host})")

    def check(sock, addr):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(addr[0]):
            violations.append(f"connect {addr}")
            raise AssertionError(f"netguard: test tried to connect to {addr}")

    def connect(self, addr):
        check(self, addr)
        return real_connect(self, addr)

    def connect_ex(self, addr):
        check(self, addr)
        return real_connect_ex(self, addr)

    mp.setattr(socket, "getaddrinfo", gai)
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket.socket, "connect_ex", connect_ex)


@pytest.fixture(scope="module")
def module_netguard():
    """`guard_network` for a whole module (its servers live that long); asserted at its end.
    Use with `pytestmark = pytest.mark.usefixtures("module_netguard")`."""
    violations: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        guard_network(mp, violations)
        yield violations
    assert not violations, violations
