"""CLI messages: every subcommand turns a user mistake into one `error:` line and exit 1 (no
traceback), options are checked against the loaded model with short messages that list the
valid values, and every subcommand is in `fastvlm --help`. The embedded demo model (16 image
tokens at 256 px) on CPU."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastvlm
from fastvlm.cli import main

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc: int, err: str, *needles: str, max_len: int = 400) -> str:
    """Exit 1, no traceback, and a first `error:` line that is short and says what is wrong."""
    assert rc == 1, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert lines, err
    assert len(lines[0]) <= max_len, f"{len(lines[0])} chars: {lines[0][:200]}…"
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------- options vs the model
@pytest.mark.parametrize("cmd", ["describe", "chat", "watch", "batch"])
@pytest.mark.parametrize("k", ["5", "64", "0", "-4", "1073741824"])
def test_tokens_per_image_checked_against_the_loaded_model(capsys, tmp_path, image, cmd, k):
    args = {
        "describe": ["describe", str(image)],
        "chat": ["chat", "--image", str(image)],
        "watch": ["watch", str(image)],
        "batch": ["batch", str(image.parent), str(tmp_path / "o.jsonl"), "-q", "--workers", "0"],
    }[cmd]
    rc, out, err = run_main(capsys, *args, "--tokens-per-image", k, "--max-tokens", "2")
    assert_error(rc, err, f"tokens per image {k}", "16 image tokens", "16, 9, 4, 1")
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


@pytest.mark.parametrize("cmd", ["describe", "watch", "batch"])
@pytest.mark.parametrize("size", ["0", "-64", "100", "99968", "1000000"])
def test_image_size_checked_up_front(capsys, tmp_path, image, cmd, size):
    args = {
        "describe": ["describe", str(image)],
        "watch": ["watch", str(image)],
        "batch": ["batch", str(image.parent), str(tmp_path / "o.jsonl"), "-q", "--workers", "0"],
    }[cmd]
    rc, out, err = run_main(capsys, *args, "--image-size", size, "--max-tokens", "2")
    assert_error(rc, err, f"image_size {size} is not valid", "multiple of")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--max-frames", "0"], "max frames 0"),
        (["--max-frames", "-3"], "max frames -3"),
        (["--max-frames", "100000"], "max frames 100000"),
        (["--fps", "0"], "fps 0.0"),
        (["--fps", "-2"], "fps -2.0"),
        (["--fps", "nan"], "fps nan"),
        (["--max-images", "0"], "max images 0"),
    ],
)
def test_video_and_image_limits_checked_up_front(capsys, image, flags, needle):
    rc, out, err = run_main(capsys, "describe", str(image), *flags, "--max-tokens", "2")
    assert_error(rc, err, needle)
    assert not out  # nothing was described before the check


@pytest.mark.parametrize("frames", ["0", "-1", "5000"])
def test_watch_frames_checked(capsys, image, frames):
    rc, out, err = run_main(capsys, "watch", str(image), "--frames", frames)
    assert_error(rc, err, f"--frames {frames}")


def test_valid_values_are_listed_but_never_a_huge_list():
    from fastvlm.errors import ConfigError
    from fastvlm.options import check_tokens_per_image, short_list

    for native in (1, 16, 256, 1 << 30):
        with pytest.raises(ConfigError) as e:
            check_tokens_per_image(3, native)
        assert len(str(e.value)) < 200, str(e.value)
        assert str(native) in str(e.value)
    assert check_tokens_per_image(None, 16) is None and check_tokens_per_image(9, 16) == 9
    for bad in (True, 2.0, "4", 17, 25):
        with pytest.raises(ConfigError):
            check_tokens_per_image(bad, 16)
    assert short_list(range(100)) == "0, 1, 2, …, 98, 99"
    # the model's own check (library path) is short too
    from fastvlm.model.fastvlm import check_tokens_per_image as model_check

    with pytest.raises(ValueError) as e:
        model_check(5, 1 << 30)
    assert len(str(e.value)) < 250


# ---------------------------------------------------------------------- one dispatcher
def test_help_lists_every_subcommand():
    from fastvlm.cli import TOOLS

    r = subprocess.run(
        [sys.executable, "-m", "fastvlm", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert r.returncode == 0
    for cmd in [*TOOLS, "describe", "chat", "download", "convert"]:
        assert f"\n    {cmd} " in r.stdout, (cmd, r.stdout)


BAD_INPUTS = [
    ["describe", "{tmp}/missing.png"],
    ["describe", "{tmp}/missing.mp4"],
    ["describe", "{tmp}/garbage.mp4"],
    ["describe", "{img}", "--model", "{tmp}/no-such-model"],
    ["describe", "{img}", "--model", "not a repo id!"],
    ["describe", "{img}", "--model", "{coreml}"],
    ["download", "not a repo id!"],
    ["download", "a/" + "b" * 120],
    ["convert", "{tmp}/missing", "{tmp}/out", "--to", "hf"],
    ["convert", "tiny", "{img}/under-a-file", "--to", "hf"],
    ["download", "tiny", "--dir", "{img}/under-a-file"],
    ["batch", "{imgdir}", "{tmp}", "-q", "--workers", "0"],
    ["batch", "{imgdir}", "{tmp}/o.jsonl", "-q", "--max-tokens", "0"],
    ["batch", "{imgdir}", "{tmp}/o.jsonl", "-q", "--limit", "-1"],
    ["batch", "{imgdir}", "{tmp}/o.jsonl", "-q", "--workers", "-1"],
    ["batch", "{tmp}/missing", "{tmp}/o.jsonl"],
    ["batch", "{tmp}/garbage.parquet", "{tmp}/o.jsonl", "-q"],
    ["batch", "{tmp}/latin1.csv", "{tmp}/o.jsonl", "-q"],
    ["batch", "{img}", "{tmp}/o.jsonl", "--model", "{tmp}/no-such-model"],
    ["watch", "{tmp}/missing.mp4"],
    ["watch", "{tmp}/garbage.mp4"],
    ["watch", "{img}", "--every", "soon"],
    ["eval", "--data", "{tmp}/missing.jsonl"],
    ["bench", "--model", "{tmp}/no-such-model"],
    ["lora", "merge", "{tmp}/missing", "{tmp}/missing-adapter", "{tmp}/merged"],
    ["quantize", "{tmp}/missing", "{tmp}/q"],
    ["export", "coreml", "{tmp}/missing", "{tmp}/x"],
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, image):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 20)
    (tmp / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp / "latin1.csv").write_bytes("image\ncaf\xe9.png\n".encode("latin-1"))
    coreml = tmp / "coreml-export"
    coreml.mkdir()
    (coreml / "config.json").write_text((fastvlm.hub.DEFAULT_MODEL / "config.json").read_text())
    (coreml / "fastvlm_export.json").write_text(json.dumps({"format": "coreml", "packages": {}}))
    return {"tmp": str(tmp), "img": str(image), "imgdir": str(image.parent), "coreml": str(coreml)}


@pytest.mark.parametrize("argv", BAD_INPUTS, ids=lambda a: " ".join(a)[:60])
def test_bad_inputs_give_one_error_line_in_every_subcommand(capsys, bad_files, argv, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [a.format(**bad_files) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors: exit 2 with a usage line, no traceback
        rc = e.code
    out, err = capsys.readouterr()
    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 1:
        assert_error(rc, err)


def test_bad_inputs_in_a_real_process_print_no_traceback(bad_files):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for argv in (BAD_INPUTS[2], BAD_INPUTS[5], BAD_INPUTS[6]):
        r = subprocess.run(
            [sys.executable, "-m", "fastvlm", *[a.format(**bad_files) for a in argv]],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error:") and len(r.stderr.splitlines()) == 1, r.stderr


def test_the_messages_name_the_problem(capsys, bad_files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run_main(capsys, "describe", bad_files["img"], "--model", bad_files["coreml"])
    line = assert_error(rc, err, "coreml export", "Core ML")
    assert "no fastvlm_export.json" not in line
    rc, _, err = run_main(capsys, "download", "not a repo id!")
    line = assert_error(rc, err, "not a Hugging Face repo id")
    assert "HFValidationError" not in line
    rc, _, err = run_main(capsys, "watch", bad_files["tmp"] + "/garbage.mp4")
    line = assert_error(rc, err, "not a readable video")
    assert "Errno" not in line


def test_user_error_classifies_third_party_errors():
    from huggingface_hub.errors import HFValidationError

    from fastvlm.cli import user_error

    assert user_error(HFValidationError("Repo id must be ...\nmore")) == (
        "HFValidationError: Repo id must be ..."
    )
    assert "nope.txt" in user_error(FileNotFoundError(2, "No such file", "nope.txt"))
    assert user_error(ValueError("bad value")) == "bad value"
    assert "out of memory" in user_error(MemoryError())
    assert user_error(RuntimeError("a bug")) is None  # a bug: main says "unexpected …"


def test_an_unexpected_error_is_one_line_unless_asked(capsys, monkeypatch):
    from fastvlm.cli import convert as convert_cmd

    def boom(a):
        raise RuntimeError("internal invariant broken")

    monkeypatch.setattr(convert_cmd, "convert", boom)
    argv = ["convert", "a", "b", "--to", "hf"]
    rc, _, err = run_main(capsys, *argv)
    assert_error(rc, err, "unexpected RuntimeError", "FASTVLM_TRACEBACK=1")
    monkeypatch.setenv("FASTVLM_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(argv)


# ---------------------------------------------------------------------- download
@pytest.mark.parametrize("name", ["tiny", "TINY", "default"])
def test_download_of_the_embedded_model_prints_its_folder(capsys, name):
    rc, out, err = run_main(capsys, "download", name)
    assert rc == 0, err
    assert Path(out.strip()) == fastvlm.hub.DEFAULT_MODEL


def test_download_of_a_local_folder_into_dir_copies_it(capsys, tmp_path):
    rc, out, err = run_main(capsys, "download", "tiny", "--dir", str(tmp_path / "copy"))
    assert rc == 0, err
    assert (tmp_path / "copy" / "config.json").exists() and out.strip() == str(tmp_path / "copy")


# ---------------------------------------------------------------------- TTFT
@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_ttft_counts_image_loading(monkeypatch, image, engine, n_images):
    import time

    import fastvlm.processing as processing

    vlm = fastvlm.load(device="cpu", engine=engine)
    vlm.describe(str(image), max_tokens=2)  # warm: engine built, vision cache irrelevant
    real = processing.load_image

    def slow_load(src):
        time.sleep(0.3)
        return real(src)

    monkeypatch.setattr(processing, "load_image", slow_load)
    t0 = time.perf_counter()
    first = None
    msgs = vlm.describe_messages([str(image)] * n_images, "Describe.")
    for _ in vlm.stream_chunks(msgs, max_tokens=3):
        first = first or time.perf_counter() - t0
    s = vlm.last_stats
    assert s.ttft_s >= 0.3 * n_images, (s.ttft_s, s.preprocess_s, s.prefill_s)
    assert s.ttft_s <= first + 0.05  # never more than what a caller saw
    assert s.preprocess_s >= 0.3 * n_images and s.ttft_s == s.preprocess_s + s.prefill_s


# ---------------------------------------------------------------------- Core ML noise
def test_coreml_third_party_noise_is_hidden_unless_verbose(capsys):
    from tqdm import tqdm

    from fastvlm.export.coreml import third_party_quiet

    def noisy():
        logging.getLogger("coremltools").warning("Torch version X has not been tested")
        warnings.warn("a FutureWarning from deep inside", FutureWarning, stacklevel=1)
        for _ in tqdm(range(3), desc="Running MIL default pipeline"):
            pass
        print("our own progress line")

    with third_party_quiet(verbose=False):
        noisy()
    out, err = capsys.readouterr()
    assert err == "" and out == "our own progress line\n"
    buf = io.StringIO()
    with third_party_quiet(verbose=True), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sys.stderr, old = buf, sys.stderr
        try:
            noisy()
        finally:
            sys.stderr = old
    assert "Running MIL" in buf.getvalue() and w


@pytest.mark.slow
def test_coreml_export_prints_no_third_party_noise(tmp_path):
    pytest.importorskip("coremltools")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "fastvlm", "export", "coreml", "tiny", str(tmp_path / "cm")]
        + ["--no-parity", "--preset", "balanced"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stderr) < 200, r.stderr[:2000]
