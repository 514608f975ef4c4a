"""`fastvlm train` run hygiene: flag mistakes are one `error:` line up front; a non-empty
--output needs --resume / --overwrite; --resume refuses a checkpoint of a different run (listing
what differs) unless --force; outputs are saved in the source dtype (train, quantize, lora merge)
with exact resume kept through fp32 master copies; derived folders get their own README."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import fastvlm
from fastvlm.cli import main as cli_main
from fastvlm.train import checkpoint, loop

DEMO = Path(fastvlm.__file__).parent / "assets" / "fastvlm-tiny"


def data(folder: Path, answers=("red", "blue", "green", "white"), name="d.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, a in zip(("red", "blue", "green", "white"), answers, strict=True):
        Image.new("RGB", (40, 30), c).save(folder / f"{c}.png")
        rows.append({"image": f"{c}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": a}]})
    (folder / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / name


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(["train", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def one_error(rc: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------- flag checks
BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "-3"], "--batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--epochs", "-2"], "--epochs must be >= 1"),
    (["--max-steps", "-1"], "--max-steps must be >= 0"),
    (["--save-every", "-5"], "--save-every must be >= 0"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--lora", "--lora-r", "0"], "--lora-r must be >= 1"),
    (["--lora", "--lora-alpha", "-4"], "--lora-alpha must be > 0"),
    (["--lora", "--lora-dropout", "1.5"], "--lora-dropout must be >= 0 and < 1"),
    (["--max-steps", "3", "--warmup", "10"], "--warmup 10 is longer than the run"),
    (["--warmup", "99"], "--warmup 99 is longer than the run (2 steps)"),  # 4 rows / batch 2
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--keep", "0"], "--keep must be >= 1"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--clip", "nan"], "--clip must be a finite number"),
    (["--max-length", "0"], "--max-length must be >= 1"),
    (["--freeze", "vison"], "invalid choice: 'vison'"),
    (["--batch-size", "two"], "invalid int value: 'two'"),
    (["--lora", "--lora-targets", "qkv_proj"], "no Linear layer matches"),
    (["--image-dir", "NOT_A_DIR"], "--image-dir NOT_A_DIR is not a folder"),
    (["--stop-after", "9", "--max-steps", "3"], "--stop-after 9 is past --max-steps 3"),
    (["--force"], "--force only applies with --resume"),
    (["--resume", "--overwrite"], "pick one"),
    (["--save-dtype", "fp8"], "invalid choice: 'fp8'"),
]


@pytest.mark.parametrize(("flags", "says"), BAD_FLAGS, ids=lambda x: " ".join(x)
                         if isinstance(x, list) else None)  # fmt: skip
def test_bad_flags_are_one_error_line(tmp_path, tiny_dir, capsys, flags, says):
    d = data(tmp_path / "data")
    rc, err = run(capsys, "--model", str(tiny_dir), "--data", str(d), "-o", str(tmp_path / "o"),
                  "--device", "cpu", "--quiet", "--batch-size", "2", *flags)  # fmt: skip
    assert says in one_error(rc, err)
    assert not list((tmp_path / "o").glob("checkpoint-*"))


def test_missing_files_and_quantized_models_are_refused(tmp_path, tiny_dir, capsys):
    d = data(tmp_path / "data")
    base = ["-o", str(tmp_path / "o"), "--device", "cpu", "--quiet"]
    rc, err = run(capsys, "--model", str(tiny_dir), "--data", str(tmp_path / "nope.jsonl"), *base)
    assert "--data" in one_error(rc, err) and "not found" in err
    rc, err = run(capsys, "--model", str(tiny_dir), "--data", str(tmp_path / "data"), *base)
    assert "is a folder" in one_error(rc, err)
    rc, err = run(capsys, "--model", str(tmp_path / "no_model"), "--data", str(d), *base)
    one_error(rc, err)
    rc, err = run(capsys, "--model", str(tiny_dir), "--data", str(d), "-o", str(tiny_dir),
                  "--overwrite", "--device", "cpu")  # fmt: skip
    assert "not the --model folder" in one_error(rc, err) and (tiny_dir / "config.json").exists()
    rc, err = run(capsys, "--model", str(tiny_dir), "--data", str(d), "-o", str(d / "sub"))
    assert "is a file, not a folder" in one_error(rc, err)
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{not json")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00garbage")
    fresh = ["--data", str(d), *base]
    assert "--init-config" in one_error(*run(capsys, "--init-config", str(cfg), "--tokenizer",
                                              str(tiny_dir / "tokenizer.json"), *fresh))
    from conftest import tiny_config

    cfg.write_text(json.dumps(tiny_config().to_dict()))
    assert "--tokenizer" in one_error(*run(capsys, "--init-config", str(cfg), "--tokenizer",
                                           str(junk), *fresh))  # fmt: skip
    assert "--init-vision" in one_error(*run(capsys, "--init-config", str(cfg), "--tokenizer",
                                             str(tiny_dir / "tokenizer.json"), "--init-vision",
                                             str(junk), *fresh))  # fmt: skip
    for scheme in ("int8", "int4"):
        q = tmp_path / f"q_{scheme}"
        assert cli_main(["quantize", str(tiny_dir), str(q), "-q", f"llm={scheme}", "--quiet"]) == 0
        capsys.readouterr()
        rc, err = run(capsys, "--model", str(q), "--data", str(d), *base)
        assert "cannot train a quantized model" in one_error(rc, err)
        assert "fp16/fp32 source" in err


# ---------------------------------------------------------------------- output / resume
def train(capsys, tmp_path, out: str, *flags: str, d: Path | None = None, ok=True) -> str:
    d = d or data(tmp_path / "data")
    rc, err = run(capsys, "--model", str(tmp_path / "tiny"), "--data", str(d), "-o",
                  str(tmp_path / out), "--device", "cpu", "--quiet", "--batch-size", "2",
                  "--warmup", "0", "--lr", "1e-3", *flags)  # fmt: skip
    if ok:
        assert rc == 0, err
    else:
        return one_error(rc, err)
    return err


def test_non_empty_output_needs_resume_or_overwrite(tmp_path, tiny_dir, capsys):
    train(capsys, tmp_path, "o", "--max-steps", "4", "--save-every", "1", "--keep", "5")
    old = sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*"))
    assert old == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    msg = train(capsys, tmp_path, "o", "--max-steps", "2", ok=False)
    assert "is not empty" in msg and "--resume" in msg and "--overwrite" in msg
    (tmp_path / "o" / "my_notes.txt").write_text("keep me")
    train(capsys, tmp_path, "o", "--max-steps", "2", "--overwrite")
    names = {p.name for p in (tmp_path / "o").iterdir()}
    assert not any(n.startswith("checkpoint-") for n in names), names  # old run's are gone
    assert {"model.safetensors", "my_notes.txt", "README.md"} <= names
    assert json.loads((tmp_path / "o" / "trainer_state.json").read_text())["step"] == 2
    # a finished run has nothing to resume; a folder without checkpoints neither
    msg = train(capsys, tmp_path, "o", "--max-steps", "2", "--resume", ok=False)
    assert "finished run (step 2)" in msg
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    msg = train(capsys, tmp_path, "other", "--max-steps", "2", "--resume", ok=False)
    assert "no checkpoint-N folder" in msg


CHANGES = [
    (["--lr", "2e-3"], "--lr 0.001 → 0.002"),
    (["--batch-size", "1"], "--batch-size 2 → 1"),
    (["--grad-accum", "2"], "--grad-accum 1 → 2"),
    (["--seed", "7"], "--seed 0 → 7"),
    (["--max-steps", "5"], "--max-steps 4 → 5"),
    (["--freeze", "vision"], "--freeze [] → ['vision']"),
    (["--lora"], "--lora False → True"),
    (["DATA"], "the file's contents differ"),
    (["MODEL"], "different weights"),
]


@pytest.mark.parametrize(("change", "says"), CHANGES, ids=lambda x: " ".join(x)
                         if isinstance(x, list) else None)  # fmt: skip
def test_resume_refuses_a_different_run_unless_forced(tmp_path, tiny_dir, capsys, change, says):
    train(capsys, tmp_path, "o", "--max-steps", "4", "--save-every", "2")
    for p in (tmp_path / "o").iterdir():  # as if it had crashed after its first checkpoint
        if p.name != "checkpoint-2":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    flags = ["--max-steps", "4"]
    d = None
    if change == ["DATA"]:
        d = data(tmp_path / "data2", answers=("one", "two", "three", "four"))
    elif change == ["MODEL"]:
        from conftest import make_tiny_model

        from fastvlm.weights import save_checkpoint

        m = make_tiny_model(seed=1, vocab_size=300)
        save_checkpoint(m.state_dict(), m.config, tmp_path / "tiny", "fastvlm")  # new weights
    else:
        flags = [*change] + (["--max-steps", "4"] if "--max-steps" not in change else [])
    msg = train(capsys, tmp_path, "o", *flags, "--resume", d=d, ok=False)
    assert "different settings" in msg and says in msg, msg
    assert "--resume --force" in msg
    if change in (["--lora"], ["--freeze", "vision"]):  # other trainable set: --force cannot help
        msg = train(capsys, tmp_path, "o", *flags, "--resume", "--force", d=d, ok=False)
        assert "--lora" in msg or "--freeze" in msg
        return
    err = train(capsys, tmp_path, "o", *flags, "--resume", "--force", d=d)
    assert "warning: --force" in err and says in err and "at step 2" in err


def test_stop_after_stage_may_change_the_data_not_the_hyper_parameters(tmp_path, tiny_dir,
                                                                         capsys):  # fmt: skip
    train(capsys, tmp_path, "o", "--max-steps", "4", "--stop-after", "2")
    d2 = data(tmp_path / "data2", answers=("one", "two", "three", "four"))
    msg = train(capsys, tmp_path, "o", "--max-steps", "4", "--lr", "5e-3", "--resume", d=d2,
                ok=False)  # fmt: skip
    assert "--lr 0.001 → 0.005" in msg and "contents differ" not in msg
    err = train(capsys, tmp_path, "o", "--max-steps", "4", "--resume", d=d2)
    assert "next stage from checkpoint-2" in err and "at step 2" in err


@pytest.mark.parametrize("damage", ["trainer_state.json", "optimizer/optimizer.safetensors",
                                    "model.safetensors"])  # fmt: skip
def test_a_damaged_checkpoint_is_one_error_line(tmp_path, tiny_dir, capsys, damage):
    train(capsys, tmp_path, "o", "--max-steps", "4", "--stop-after", "2")
    (tmp_path / "o" / "checkpoint-2" / damage).write_bytes(b"\x00\x01 truncated")
    msg = train(capsys, tmp_path, "o", "--max-steps", "4", "--resume", ok=False)
    assert "checkpoint-2" in msg and ("corrupt" in msg or "cannot read" in msg), msg


def test_same_settings_resume_without_a_word(tmp_path, tiny_dir, capsys):
    train(capsys, tmp_path, "o", "--max-steps", "4", "--stop-after", "2")
    err = train(capsys, tmp_path, "o", "--max-steps", "4", "--resume", "--workers", "0")
    assert "at step 2" in err and "warning" not in err and "different" not in err


# ---------------------------------------------------------------------- save dtype + card
def st_dtypes(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def part_bytes(path: Path, prefix: str, keys: set[str] | None = None) -> int:
    from fastvlm.dtypes import safetensors_bytes  # noqa: F401 (the code under test reads the same)

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k.startswith(prefix) and (keys is None or k.rsplit(".", 1)[0] in keys))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantized_demo_model_is_smaller_than_its_fp16_source(tmp_path, capsys, scheme):
    src = DEMO / "model.safetensors"
    assert set(st_dtypes(src).values()) == {"F16"}
    out = tmp_path / "q"
    assert cli_main(["quantize", str(DEMO), str(out), "-q", f"llm={scheme}", "--quiet"]) == 0
    printed = capsys.readouterr().out
    dst = out / "model.safetensors"
    assert dst.stat().st_size < src.stat().st_size
    floats = {d for d in st_dtypes(dst).values() if d.startswith(("F", "BF"))}
    assert floats == {"F16"}  # unquantized parts and scales kept in the source dtype
    qlayers = {k.rsplit(".", 1)[0] for k in st_dtypes(dst) if k.endswith(".qweight")}
    fp16 = part_bytes(src, "language_model.", qlayers)
    quant = part_bytes(dst, "language_model.", qlayers)
    assert quant * (3.5 if scheme == "int4" else 1.8) <= fp16, (quant, fp16)
    assert part_bytes(dst, "language_model.") * (3 if scheme == "int4" else 1.7) <= part_bytes(
        src, "language_model.")  # embedding / norms stay fp16  # fmt: skip
    assert "weights on disk:" in printed and "llm" in printed
    readme = (out / "README.md").read_text()
    assert "meets the project's targets" not in readme and "quantization" in readme
    # the saved model computes what the in-memory quantized one does (up to fp16 scales)
    from fastvlm.quant import quantize_model
    from fastvlm.weights import load_model

    ref = load_model(DEMO)
    quantize_model(ref, f"llm={scheme}")
    got = load_model(out)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = ref(ids), got(ids)  # logits
    assert (a - b).abs().max() <= 3e-2 * a.abs().max(), (a - b).abs().max()


def test_fine_tune_of_fp16_demo_is_fp16_sized_with_its_own_card(tmp_path, capsys, monkeypatch):
    d = data(tmp_path / "data")
    seen = {}
    real = loop.write_output

    def spy(out, model, *a, **k):
        seen["model"] = model
        return real(out, model, *a, **k)

    monkeypatch.setattr(loop, "write_output", spy)
    rc, err = run(capsys, "--model", str(DEMO), "--data", str(d), "-o", str(tmp_path / "ft"),
                  "--device", "cpu", "--quiet", "--max-steps", "1", "--batch-size", "2",
                  "--warmup", "0", "--freeze", "vision")  # fmt: skip
    assert rc == 0, err
    src, dst = DEMO / "model.safetensors", tmp_path / "ft" / "model.safetensors"
    assert set(st_dtypes(dst).values()) == {"F16"}
    assert abs(dst.stat().st_size - src.stat().st_size) < 0.01 * src.stat().st_size
    assert "weights on disk:" in err
    loaded = fastvlm.weights.load_model(tmp_path / "ft")
    trained = seen["model"]
    for k, v in loaded.state_dict().items():  # the saved weights are the trained ones, fp16-rounded
        ref = trained.state_dict()[k]
        if v.is_floating_point():
            assert torch.allclose(v, ref.half().float(), atol=0, rtol=0), k
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "meets the project's targets" not in card and "0.955" not in card
    for fact in ("base model", str(DEMO), "steps | 1", "learning rate", "final loss", "d.jsonl",
                 "4 usable rows", "fp16"):  # fmt: skip
        assert fact in card, fact
    # fp32 on request: twice the size
    rc, err = run(capsys, "--model", str(DEMO), "--data", str(d), "-o", str(tmp_path / "f32"),
                  "--device", "cpu", "--quiet", "--max-steps", "1", "--batch-size", "2",
                  "--warmup", "0", "--freeze", "vision", "--save-dtype", "fp32")  # fmt: skip
    assert rc == 0 and set(st_dtypes(tmp_path / "f32" / "model.safetensors").values()) == {"F32"}


def test_fp16_checkpoints_still_resume_exactly(tmp_path, capsys):
    """Checkpoint weights are fp16 like the source; their fp32 training values ride in the
    optimizer file, so a stop + resume equals the uninterrupted run."""
    d = data(tmp_path / "data")
    common = ["--model", str(DEMO), "--data", str(d), "--device", "cpu", "--quiet",
              "--batch-size", "2", "--warmup", "0", "--lr", "1e-3", "--freeze", "vision",
              "--max-steps", "3"]  # fmt: skip
    assert run(capsys, *common, "-o", str(tmp_path / "whole"))[0] == 0
    assert run(capsys, *common, "-o", str(tmp_path / "staged"), "--stop-after", "1")[0] == 0
    ck = tmp_path / "staged" / "checkpoint-1"
    assert set(st_dtypes(ck / "model.safetensors").values()) == {"F16"}
    opt = load_file(str(ck / checkpoint.OPTIMIZER_FILE))
    assert any(k.startswith("master.language_model.") for k in opt)
    assert not any(k.startswith("master.vision_tower.") for k in opt)  # frozen: exact in fp16
    assert run(capsys, *common, "-o", str(tmp_path / "staged"), "--resume")[0] == 0
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "staged" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_merge_keeps_the_source_dtype(tmp_path, capsys):
    d = data(tmp_path / "data")
    rc, err = run(capsys, "--model", str(DEMO), "--data", str(d), "-o", str(tmp_path / "lo"),
                  "--device", "cpu", "--quiet", "--max-steps", "1", "--batch-size", "2",
                  "--warmup", "0", "--lora")  # fmt: skip
    assert rc == 0, err
    merged = tmp_path / "merged"
    assert cli_main(["lora", "merge", str(DEMO), str(tmp_path / "lo" / "adapter"), str(merged)]) == 0
    dst = merged / "model.safetensors"
    assert set(st_dtypes(dst).values()) == {"F16"}
    src = DEMO / "model.safetensors"
    assert abs(dst.stat().st_size - src.stat().st_size) < 0.01 * src.stat().st_size
    assert "meets the project's targets" not in (merged / "README.md").read_text()
    assert "weights on disk:" in capsys.readouterr().err


def test_convert_keeps_the_source_dtype(tmp_path, capsys):
    for fmt in ("hf", "apple"):
        assert cli_main(["convert", str(DEMO), str(tmp_path / fmt), "--to", fmt]) == 0
        dst = tmp_path / fmt / "model.safetensors"
        assert set(st_dtypes(dst).values()) == {"F16"}
        src = DEMO / "model.safetensors"
        assert abs(dst.stat().st_size - src.stat().st_size) < 0.01 * src.stat().st_size


def test_explicit_fp16_checkpoints_of_a_train_form_model_resume_exactly(tmp_path, tokenizer,
                                                                         capsys):  # fmt: skip
    """fp32 model trained whole (vision tower with live BatchNorm statistics), saved as fp16:
    every tensor the rounding changes (weights and BN buffers) is restored from its fp32 copy."""
    from conftest import tiny_config

    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size())
    cfg.vision.inference_mode = False
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    tokenizer.save(str(tmp_path / "tok.json"))
    d = data(tmp_path / "data")
    common = ["--init-config", str(tmp_path / "cfg.json"), "--tokenizer", str(tmp_path / "tok.json"),
              "--data", str(d), "--device", "cpu", "--quiet", "--batch-size", "2", "--warmup", "0",
              "--lr", "1e-3", "--max-steps", "3", "--save-dtype", "fp16"]  # fmt: skip
    assert run(capsys, *common, "-o", str(tmp_path / "whole"))[0] == 0
    assert run(capsys, *common, "-o", str(tmp_path / "staged"), "--stop-after", "1")[0] == 0
    opt = load_file(str(tmp_path / "staged" / "checkpoint-1" / checkpoint.OPTIMIZER_FILE))
    assert any(k.endswith("running_var") for k in opt)  # BN statistics changed by training
    assert run(capsys, *common, "-o", str(tmp_path / "staged"), "--resume")[0] == 0
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "staged" / "model.safetensors"))
    assert {t.dtype for t in a.values() if t.is_floating_point()} == {torch.float16}
    for k in a:
        assert torch.equal(a[k], b[k]), k
