"""The Backend boundary (fastvlm/backends/): a new runtime is one class + one registry line,
`FastVLM` and the server only talk to the protocol, and the torch and ONNX Runtime backends
conform to it and agree token for token on the demo model."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import torch
from PIL import Image
from server_harness import Server

import fastvlm
from fastvlm.backends import BACKENDS, Backend, Generation, open_backend
from fastvlm.backends.step import StepGeneration
from fastvlm.backends.torch import TorchBackend
from fastvlm.engine.generate import Stats
from fastvlm.engine.sampling import SamplingParams
from fastvlm.errors import ConfigError, ImageError
from fastvlm.server.app import ServerConfig, create_app
from fastvlm.tokenization import generation_limits
from fastvlm.weights import load_config

REPLY = "a small red circle"
CHAT = "/v1/chat/completions"


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


needs_ort = pytest.mark.skipif(
    not (has_module("onnx") and has_module("onnxruntime")), reason="onnx/onnxruntime missing"
)


def images(n: int, size: int = 40) -> list[Image.Image]:
    colours = ("red", "blue", "green", "white", "black")
    return [Image.new("RGB", (size + 7 * i, size), colours[i % 5]) for i in range(n)]


# ---------------------------------------------------------------------- a third backend
class FakeGeneration:
    """Replies REPLY (then EOS), one token per `delay`; records how many run at once."""

    active = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, ids: list[int], eos: int, delay: float) -> None:
        self.stats = Stats(prompt_tokens=0)
        self.finish_reason: str | None = None
        self.cancelled = False
        self._ids, self._eos, self._delay = ids, eos, delay

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self):
        cls = FakeGeneration
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            for i, tok in enumerate([*self._ids, self._eos]):
                if self.cancelled:
                    self.finish_reason = "cancelled"
                    return
                time.sleep(self._delay)
                self.stats.generation_tokens = i + 1
                if tok == self._eos:  # as the engine: the reason is set before EOS is seen
                    self.finish_reason = "stop"
                yield tok
            self.finish_reason = "stop"
        finally:
            with cls.lock:
                cls.active -= 1


class FakeBackend:
    """Everything a backend must do, and nothing else: the 'one file' of a new runtime."""

    name: ClassVar[str] = "fake"

    def __init__(self, folder: Path, tokenizer, batches: bool, delay: float = 0.0) -> None:
        self.config = load_config(folder)
        self.eos_ids, self.vocab_limit = generation_limits(
            self.config.text.eos_token_id, tokenizer
        )
        self._reply = tokenizer.encode(REPLY).ids
        self._batches, self._delay = batches, delay
        self.calls: list[dict[str, Any]] = []
        self.generations: list[FakeGeneration] = []

    @property
    def batches_concurrently(self) -> bool:
        return self._batches

    device = "fake:0"
    dtype = "int3"

    @property
    def max_len(self) -> int:
        return 128

    def encode_images(self, pixels, tokens_per_image=None):
        k = tokens_per_image or self.config.num_image_tokens
        return torch.zeros(pixels.shape[0], k, self.config.text.hidden_size)

    def submit(self, ids, pixels, params, *, tokens_per_image=None):
        if len(ids) + params.max_tokens > self.max_len:
            raise ValueError(f"not supported on the fake backend: more than {self.max_len} tokens")
        n_img = sum(1 for i in ids if i == self.config.image_token_id)
        self.calls.append(
            {"image_tokens": n_img, "images": 0 if pixels is None else pixels.shape[0],
             "tokens_per_image": tokens_per_image, "max_tokens": params.max_tokens}
        )  # fmt: skip
        gen = FakeGeneration(self._reply[: params.max_tokens], self.eos_ids[0], self._delay)
        self.generations.append(gen)
        return gen

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "dtype": self.dtype,
                "batches_concurrently": self.batches_concurrently}  # fmt: skip

    def close(self) -> None:
        pass


@pytest.fixture
def fake_registry(monkeypatch):
    """Register the fake backend the way a new runtime is added: one registry entry."""
    opened: list[FakeBackend] = []

    def open_fake(folder, *, tokenizer=None, batches=False, delay=0.0, **_):
        opened.append(FakeBackend(folder, tokenizer, batches, delay))
        return opened[-1]

    monkeypatch.setitem(BACKENDS, "fake", open_fake)
    return opened


def test_fake_backend_conforms_and_runs_the_whole_api(fake_registry):
    vlm = fastvlm.load(None, backend="fake")
    be = vlm.backend
    assert isinstance(be, Backend) and be.name == "fake" and fake_registry == [be]
    assert "fake" in repr(vlm) and vlm.dtype == torch.float32
    two = images(2)
    assert vlm.describe(two[0], max_tokens=16) == REPLY
    assert "".join(vlm.stream(two, max_tokens=16)) == REPLY
    msgs = vlm.describe_messages(two, "Describe.")
    assert vlm.chat(msgs, max_tokens=16) == REPLY
    chunks = list(vlm.stream_chunks(msgs, tokens_per_image=4, max_tokens=16))
    assert chunks[-1].finish_reason == "stop" and "".join(c.text for c in chunks) == REPLY
    # the processor pooled the placeholder runs; the backend got the pixels and the choice
    assert be.calls[-1] == {"image_tokens": 8, "images": 2, "tokens_per_image": 4,
                            "max_tokens": 16}  # fmt: skip
    assert vlm.last_stats is be.generations[-1].stats
    # max_tokens cuts the reply; the finish reason comes from the generation
    cut = list(vlm.stream_chunks(msgs, max_tokens=2))
    assert "".join(c.text for c in cut) == vlm.tokenizer.decode(be._reply[:2])
    # a stop string ends the text and cancels the generation
    assert vlm.describe(two[0], max_tokens=16, stop=["red"]) == "a small "
    assert be.generations[-1].cancelled
    # max_images is the processor's: refused before the backend sees anything
    n = len(be.calls)
    with pytest.raises(ImageError, match="limit is 1"):
        vlm.describe(two, max_images=1)
    assert len(be.calls) == n
    # backend-specific refusals surface as they are; engine-only attributes say why not
    with pytest.raises(ValueError, match="fake backend"):
        vlm.describe(two[0], max_tokens=120)
    with pytest.raises(AttributeError, match="fake backend has no continuous-batching engine"):
        vlm.engine
    with pytest.raises(AttributeError, match="fake backend has no model object"):
        vlm.model
    ids, px = vlm.encode(msgs)
    assert vlm.generate_ids(ids, px, max_tokens=16) == [*be._reply, be.eos_ids[0]]
    gen = vlm.submit(ids, px, tokens_per_image=None, max_tokens=3)
    assert "".join(c.text for c in vlm.text_chunks(gen)) == vlm.tokenizer.decode(be._reply[:3])
    assert gen.finish_reason == "stop" and be.calls[-1]["max_tokens"] == 3


def test_unknown_backend_lists_every_registered_choice(fake_registry):
    for bad in ("onnx", "Torch", "", "mlx-gpu"):
        with pytest.raises(ConfigError, match="use auto, fake, onnxruntime, torch"):
            fastvlm.load(None, backend=bad)


def test_core_ml_folder_is_refused_whatever_the_backend(tmp_path, fake_registry):
    (tmp_path / "fastvlm_export.json").write_text('{"format": "coreml"}')
    for backend in ("auto", "torch", "onnxruntime", "fake"):
        with pytest.raises(ConfigError, match="coreml export"):
            open_backend(tmp_path, backend)


def _concurrent_chat(url: str, n: int) -> list[int]:
    body = {"model": "fastvlm-tiny", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    codes: list[int] = []
    start = threading.Barrier(n)

    def one() -> None:
        start.wait()
        codes.append(httpx.post(url + CHAT, json=body, timeout=60).status_code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return codes


@pytest.mark.parametrize("batches", [False, True])
def test_server_serialises_exactly_when_the_backend_cannot_batch(fake_registry, batches):
    vlm = fastvlm.load(None, backend="fake", backend_options={"batches": batches, "delay": 0.03})
    srv = Server(create_app(ServerConfig(), vlm=vlm))
    try:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card["backend"] == "fake" and card["device"] == "fake:0" and card["dtype"] == "int3"
        assert card["requests_serialized"] is (not batches)
        FakeGeneration.peak = 0
        assert _concurrent_chat(srv.url, 4) == [200] * 4
        if batches:
            assert FakeGeneration.peak >= 2  # the requests really overlapped
        else:
            assert FakeGeneration.peak == 1
    finally:
        srv.stop()


# ---------------------------------------------------------------------- torch + ONNX Runtime
@pytest.fixture(scope="module")
def demo():
    return fastvlm.load()  # embedded demo model, fp32 CPU, engine="fast"


@pytest.fixture(scope="module")
def demo_ref():
    return fastvlm.load(engine="reference")


@pytest.fixture(scope="module")
def ort_vlm(tmp_path_factory, demo):
    if not (has_module("onnx") and has_module("onnxruntime")):
        pytest.skip("onnx/onnxruntime missing")
    from fastvlm.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx-backend") / "quality"
    export_onnx(demo.model, out, "quality", demo.tokenizer, parity=False, log=lambda *_: None)
    return fastvlm.load(out)


def _backends(request) -> list:
    names = ["demo", "demo_ref"] + (["ort_vlm"] if has_module("onnxruntime") else [])
    return [request.getfixturevalue(n) for n in names]


def test_torch_and_ort_backends_conform_to_the_protocol(request):
    for vlm in _backends(request):
        be = vlm.backend
        assert isinstance(be, Backend), type(be)
        info = be.info()
        assert info["backend"] == be.name and info["device"] == str(be.device)
        assert info["batches_concurrently"] is be.batches_concurrently
        assert isinstance(be.dtype, str) and isinstance(be.max_len, int) and be.max_len > 0
        assert be.batches_concurrently is (vlm.engine_kind == "fast" and be.name == "torch")
        px = vlm.preprocess(images(1)[0])
        for k in (None, 4, 16):
            emb = be.encode_images(torch.cat([px, px]), k)
            want = (2, k or vlm.num_image_tokens, vlm.config.text.hidden_size)
            assert tuple(emb.shape) == want and emb.dtype == torch.float32
            assert emb.device.type == "cpu"
        ids, pix = vlm.encode(vlm.describe_messages([images(1)[0]], "Describe."))
        gen = be.submit(ids, pix, SamplingParams(max_tokens=6, ignore_eos=True))
        assert isinstance(gen, Generation)
        out = list(gen)
        assert len(out) == 6 and gen.finish_reason == "length"
        assert gen.stats.generation_tokens == 6 and gen.stats.image_tokens == 16
        # cancel from the consumer: stops early, says so
        gen = be.submit(ids, pix, SamplingParams(max_tokens=20, ignore_eos=True))
        got = []
        for tok in gen:
            got.append(tok)
            if len(got) == 2:
                gen.cancel()
        assert len(got) < 20 and gen.finish_reason == "cancelled"


def test_step_generation_finish_reasons():
    def tokens(seq):
        return lambda stats: iter(seq)

    g = StepGeneration(tokens([5, 6, 2]), {2})
    assert list(g) == [5, 6, 2] and g.finish_reason == "stop"
    g = StepGeneration(tokens([5, 6, 7]), {2})
    assert list(g) == [5, 6, 7] and g.finish_reason == "length"

    def boom(stats):
        yield 1
        raise RuntimeError("runtime died")

    g = StepGeneration(boom, {2})
    with pytest.raises(RuntimeError):
        list(g)
    assert g.finish_reason == "error"
    g = StepGeneration(tokens(range(10, 100)), {2})
    it = iter(g)
    next(it)
    it.close()  # the consumer went away
    assert g.finish_reason == "cancelled"
    # a consumer that stops reading at EOS (as text_chunks does) still sees "stop"
    for closer in ("close", "drop"):
        g = StepGeneration(tokens([5, 2, 9]), {2})
        it = iter(g)
        assert [next(it), next(it)] == [5, 2]
        if closer == "close":
            it.close()
        else:
            del it
        assert g.finish_reason == "stop"


@needs_ort
@pytest.mark.parametrize("tpi", [None, 1, 4, 16])
def test_torch_and_ort_greedy_ids_identical(demo, demo_ref, ort_vlm, tpi):
    prompts = [
        ([images(1)[0]], "Describe this image."),
        (images(2), "How many shapes are there?"),
        ([], "What color is the square?"),
    ]
    for imgs, prompt in prompts:
        ids, px = demo.encode(demo.describe_messages(imgs, prompt), tokens_per_image=tpi)
        p = SamplingParams(max_tokens=24)
        want = list(demo_ref.backend.submit(ids, px, p, tokens_per_image=tpi))
        fast = list(demo.backend.submit(ids, px, p, tokens_per_image=tpi))
        got = list(ort_vlm.backend.submit(ids, px, p, tokens_per_image=tpi))
        assert got == want == fast, (prompt, tpi)
        assert len(want) >= 2


@needs_ort
def test_every_fastvlm_method_works_on_ort(demo, ort_vlm):
    from fastvlm.backends.ort import OrtBackend

    assert isinstance(ort_vlm.backend, OrtBackend) and ort_vlm.backend.name == "onnxruntime"
    assert not ort_vlm.backend.batches_concurrently
    assert ort_vlm.device == torch.device("cpu") and ort_vlm.dtype == torch.float32
    assert "onnxruntime" in repr(ort_vlm) and ort_vlm.model.sessions
    two = images(2)
    for k in (1, 4, 9):
        want = demo.describe(two, max_tokens=16, tokens_per_image=k)
        assert ort_vlm.describe(two, max_tokens=16, tokens_per_image=k) == want
        assert ort_vlm.last_stats.image_tokens == 2 * k
    msgs = demo.describe_messages(two, "Describe.")
    assert ort_vlm.chat(msgs, max_tokens=12) == demo.chat(msgs, max_tokens=12)
    assert "".join(ort_vlm.stream_chat(msgs, max_tokens=12)) == demo.chat(msgs, max_tokens=12)
    for limit in (0, 1):
        for vlm in (demo, ort_vlm):
            with pytest.raises(ImageError, match=f"limit is {limit}"):
                vlm.describe(two, max_images=limit)
    assert ort_vlm.describe(two, max_images=2, max_tokens=4) == demo.describe(
        two, max_images=2, max_tokens=4
    )
    with pytest.raises(ValueError, match="tokens_per_image"):
        ort_vlm.describe(two[0], tokens_per_image=7)
    ids, px = ort_vlm.encode(msgs)
    out = ort_vlm.generate_ids(ids, px, max_tokens=5, ignore_eos=True)
    assert len(out) == 5 and ort_vlm.last_stats.generation_tokens == 5
    with pytest.raises(AttributeError, match="onnxruntime backend has no continuous-batching"):
        ort_vlm.engine


@needs_ort
def test_ort_refuses_torch_only_placement(ort_vlm):
    folder = ort_vlm.path
    for kw in ({"device": "cuda"}, {"device": "mps"}, {"dtype": "bfloat16"}, {"dtype": "fp16"},
               {"image_size": 512}):  # fmt: skip
        with pytest.raises(ConfigError, match="onnxruntime backend|fixed at"):
            fastvlm.load(folder, **kw)
    assert fastvlm.load(folder, device="cpu", dtype="float32").backend.name == "onnxruntime"


def test_torch_backend_falls_back_to_reference_past_engine_max_len(demo):
    be = TorchBackend(demo.model, eos_ids=demo.eos_ids, vocab_limit=demo.vocab_limit,
                      engine_options={"max_len": 64})  # fmt: skip
    ids, px = demo.encode(demo.describe_messages([images(1)[0]], "Describe this image."))
    p = SamplingParams(max_tokens=64, ignore_eos=True)
    gen = be.submit(ids, px, p)
    assert isinstance(gen, StepGeneration)  # too long for the engine: the reference decoder
    assert len(list(gen)) == 64 and be.engine.counters["steps"] == 0
    short = be.submit(ids, px, SamplingParams(max_tokens=4, ignore_eos=True))
    assert not isinstance(short, StepGeneration) and len(list(short)) == 4
    be.close()
