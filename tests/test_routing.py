"""Backend routing: `choose_backend` over a table of platforms (probes monkeypatched), the
FASTVLM_BACKEND default, and explicit-but-missing backends naming their install command."""

from __future__ import annotations

import sys

import pytest

from fastvlm.backends import routing
from fastvlm.backends.routing import Route, choose_backend
from fastvlm.errors import ConfigError


@pytest.fixture
def platform(monkeypatch):
    """Set the probes: platform(apple=..., mlx=..., cuda=..., mps=..., ort=...)."""
    monkeypatch.delenv(routing.ENV, raising=False)

    def set_(apple=False, mlx=False, cuda=False, mps=False, ort=True):
        monkeypatch.setattr(routing, "is_apple_silicon", lambda: apple)
        monkeypatch.setattr(routing, "mlx_available", lambda: mlx)
        monkeypatch.setattr(routing, "cuda_available", lambda: cuda)
        monkeypatch.setattr(routing, "mps_available", lambda: mps)
        monkeypatch.setattr(routing, "onnxruntime_available", lambda: ort)

    return set_


@pytest.fixture
def onnx_dir(tmp_path):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / routing.EXPORT_MANIFEST).write_text('{"format": "onnx"}')
    return tmp_path / "onnx"


@pytest.mark.parametrize(
    "probes,requested,device,expected",
    [
        # auto: Apple silicon with mlx + mlx-vlm -> mlx
        (dict(apple=True, mlx=True, mps=True), "auto", None, Route("mlx", "gpu")),
        # Apple silicon without them -> torch on MPS, never an error
        (dict(apple=True, mlx=False, mps=True), "auto", None, Route("torch", "mps")),
        (dict(apple=True, mlx=False, mps=False), None, None, Route("torch", "cpu")),
        # CUDA -> torch on cuda, even with mlx installed (Linux: MLX CPU is not its target)
        (dict(cuda=True, mlx=True), "auto", None, Route("torch", "cuda")),
        (dict(), "auto", None, Route("torch", "cpu")),
        (dict(mlx=True), "auto", "auto", Route("torch", "cpu")),
        # an explicit torch device makes auto pick torch, even on Apple silicon with mlx
        (dict(apple=True, mlx=True), "auto", "cpu", Route("torch", "cpu")),
        (dict(apple=True, mlx=True, mps=True), "auto", "mps", Route("torch", "mps")),
        # explicit choices
        (dict(apple=True, mlx=True, mps=True), "torch", None, Route("torch", "mps")),
        (dict(cuda=True), "torch", "cuda:1", Route("torch", "cuda:1")),
        (dict(mlx=True), "mlx", None, Route("mlx", "cpu")),
        (dict(apple=True, mlx=True), "MLX", None, Route("mlx", "gpu")),
        (dict(apple=True, mlx=True), "mlx", "cpu", Route("mlx", "cpu")),
    ],
)
def test_routing_table(platform, probes, requested, device, expected, tmp_path):
    platform(**probes)
    assert choose_backend(requested, tmp_path, device) == expected


def test_onnx_export_routes_to_onnxruntime(platform, onnx_dir):
    platform(apple=True, mlx=True, cuda=True)
    assert choose_backend("auto", onnx_dir) == Route("onnxruntime", "cpu")
    assert choose_backend("onnxruntime", onnx_dir).backend == "onnxruntime"
    for name in ("torch", "mlx"):
        with pytest.raises(ConfigError, match="ONNX export"):
            choose_backend(name, onnx_dir)
    platform(ort=False)
    with pytest.raises(ConfigError, match=r"pip install .*onnxruntime"):
        choose_backend("auto", onnx_dir)


def test_env_default_and_argument_precedence(platform, monkeypatch, tmp_path):
    platform(apple=True, mlx=True)
    monkeypatch.setenv(routing.ENV, "torch")
    assert choose_backend(None, tmp_path).backend == "torch"
    assert choose_backend("", tmp_path).backend == "torch"
    assert choose_backend("mlx", tmp_path).backend == "mlx"  # the argument wins
    monkeypatch.setenv(routing.ENV, "auto")
    assert choose_backend(None, tmp_path).backend == "mlx"
    monkeypatch.setenv(routing.ENV, "tensorflow")
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'"):
        choose_backend(None, tmp_path)


@pytest.mark.parametrize("bad", ["cuda", "tpu", "mlx-vlm", "0", "ort", "pytorch"])
def test_unknown_backend_names(platform, bad):
    platform()
    with pytest.raises(ConfigError, match="unknown backend"):
        choose_backend(bad)


def test_mlx_device_must_be_gpu_or_cpu(platform):
    platform(apple=True, mlx=True)
    with pytest.raises(ConfigError, match="not supported on the mlx backend: device 'cuda'"):
        choose_backend("mlx", None, "cuda")


@pytest.mark.parametrize("missing", ["mlx", "mlx_vlm"])
def test_explicit_mlx_missing_names_pip_and_auto_falls_back(monkeypatch, tmp_path, missing):
    """The real probe with the import made impossible (sys.modules[name] = None)."""
    monkeypatch.delenv(routing.ENV, raising=False)
    monkeypatch.setitem(sys.modules, missing, None)
    assert routing.mlx_available() is False
    with pytest.raises(ConfigError, match=r"'mlx' was requested but is not installed: pip install"):
        choose_backend("mlx", tmp_path)
    monkeypatch.setattr(routing, "is_apple_silicon", lambda: True)
    assert choose_backend("auto", tmp_path).backend == "torch"  # auto never fails for it


def test_explicit_onnxruntime_missing_names_pip(monkeypatch, onnx_dir):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match="pip install"):
        choose_backend("onnxruntime", onnx_dir)


def test_real_probes_answer_here():
    assert isinstance(routing.is_apple_silicon(), bool)
    assert isinstance(routing.mlx_available(), bool)
    assert isinstance(routing.cuda_available(), bool)
