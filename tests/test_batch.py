"""`fastvlm batch`: inputs (folder, JSONL, CSV, Parquet), error rows, resume after a kill, and
Ray Data against local processes. The embedded demo model on CPU; images generated in the test."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import has_module

import fastvlm
import fastvlm.hub
from fastvlm.batch import load_items, read_done, run
from fastvlm.errors import FastVLMError
from fastvlm.train.shapes import make_example

ROOT = Path(__file__).parent.parent
PROMPT = "Describe this image."
TOKENS = 8


def make_images(folder: Path, n: int, seed: int = 7) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, _, _ = make_example(seed, i, 256)
        paths.append(folder / f"{i:03d}.png")
        img.save(paths[-1])
    return paths


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def texts(path: Path) -> dict[str, str]:
    return {r["id"]: r.get("text", r.get("error")) for r in rows(path)}


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fastvlm", "batch", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        **kw,
    )


@pytest.fixture(scope="module")
def images40(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("batch") / "images"
    make_images(d, 40)
    return d


@pytest.fixture(scope="module")
def reference(images40, tmp_path_factory) -> dict[str, str]:
    """The 40 captions from an in-process run (workers=0)."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    s = run(images40, out, PROMPT, workers=0, sampling={"max_tokens": TOKENS}, progress=False)
    assert s["done"] == 40 and s["failed"] == 0
    return texts(out)


def test_rows_match_the_python_api_and_a_corrupt_image_is_one_error_row(tmp_path):
    paths = make_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    out = tmp_path / "out.jsonl"
    s = run(tmp_path / "imgs", out, PROMPT, workers=0, sampling={"max_tokens": TOKENS})
    assert (s["done"], s["failed"], s["skipped"], s["total"]) == (5, 1, 0, 6)
    got = {r["id"]: r for r in rows(out)}
    assert set(got) == {p.name for p in paths} | {"zz_corrupt.png"}
    bad = got.pop("zz_corrupt.png")
    assert "not a readable image" in bad["error"] and "text" not in bad
    vlm = fastvlm.load(device="cpu")
    for p in paths:
        assert got[p.name]["text"] == vlm.describe(str(p), PROMPT, max_tokens=TOKENS)
        assert got[p.name]["image_tokens"] == vlm.num_image_tokens
    # rerun: everything is skipped, nothing appended; --retry-failed reruns only the error row
    s = run(tmp_path / "imgs", out, PROMPT, workers=0, sampling={"max_tokens": TOKENS})
    assert (s["done"], s["failed"], s["skipped"]) == (0, 0, 6) and len(rows(out)) == 6
    s = run(tmp_path / "imgs", out, PROMPT, workers=0, retry_failed=True)
    assert (s["done"], s["failed"], s["skipped"]) == (0, 1, 5) and len(rows(out)) == 6


def test_manifests_jsonl_csv_parquet(tmp_path):
    paths = make_images(tmp_path / "imgs", 3)
    jl = tmp_path / "m.jsonl"
    jl.write_text(
        "".join(
            json.dumps({"id": f"k{i}", "image": f"imgs/{p.name}", "prompt": "How many shapes?"})
            + "\n"
            for i, p in enumerate(paths)
        )
    )
    items = load_items(jl, PROMPT)
    assert [it["id"] for it in items] == ["k0", "k1", "k2"]
    assert items[0]["image"] == str(tmp_path / "imgs" / "000.png")
    assert items[0]["prompt"] == "How many shapes?"
    cs = tmp_path / "m.csv"
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"])
        w.writerows([[str(p)] for p in paths])
    assert [it["id"] for it in load_items(cs, PROMPT)] == [str(p) for p in paths]
    out = tmp_path / "out.jsonl"
    s = run(jl, out, PROMPT, workers=0, sampling={"max_tokens": 4}, progress=False)
    assert s["done"] == 3 and {r["id"] for r in rows(out)} == {"k0", "k1", "k2"}
    dup = tmp_path / "dup.jsonl"
    dup.write_text(
        json.dumps({"image": str(paths[0])}) + "\n" + json.dumps({"image": str(paths[0])})
    )
    items = load_items(dup, PROMPT)  # the second row is an error row; the first still runs
    assert "error" not in items[0] and "unique 'id'" in items[1]["error"]


def test_parquet_with_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = make_images(tmp_path / "imgs", 3)
    pqf = tmp_path / "m.parquet"
    data = [{"bytes": p.read_bytes(), "path": None} for p in paths]  # HF datasets' Image column
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": data}), pqf)
    out = tmp_path / "pq.jsonl"
    s = run(pqf, out, PROMPT, workers=0, sampling={"max_tokens": TOKENS}, progress=False)
    assert s["done"] == 3
    vlm = fastvlm.load(device="cpu")
    assert texts(out)["a"] == vlm.describe(str(paths[0]), PROMPT, max_tokens=TOKENS)


def test_a_model_that_cannot_load_fails_the_job_cleanly(tmp_path):
    make_images(tmp_path / "imgs", 2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    r = cli(str(tmp_path / "imgs"), str(tmp_path / "o.jsonl"), "--model", str(broken), "-q")
    assert r.returncode == 1 and "cannot read" in r.stderr, r.stderr  # checked by the driver
    assert "Traceback" not in r.stderr
    (broken / "config.json").write_text((fastvlm.hub.DEFAULT_MODEL / "config.json").read_text())
    r = cli(str(tmp_path / "imgs"), str(tmp_path / "o.jsonl"), "--model", str(broken), "-q")
    assert r.returncode == 1 and "could not load the model" in r.stderr, r.stderr  # in a worker
    assert "Traceback" not in r.stderr
    r = cli(str(tmp_path / "imgs"), str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "missing"))
    assert r.returncode == 1 and r.stderr.startswith("error:"), r.stderr


def test_torn_last_line_is_cut(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": "b", "err')
    assert read_done(out) == {"a"}
    assert out.read_text() == '{"id": "a", "text": "x"}\n'


def test_kill_midway_then_rerun_finishes_without_duplicates(images40, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    args = (str(images40), str(out), "--max-tokens", str(TOKENS), "--batch-size", "1", "-q")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastvlm", "batch", *args, "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the worker too
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(rows(out))
    assert 5 <= first < 40
    r = cli(*args, "--workers", "1")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == first and summary["done"] == 40 - first
    ids = [x["id"] for x in rows(out)]
    assert len(ids) == 40 and len(set(ids)) == 40  # nothing redone, nothing duplicated
    assert texts(out) == reference  # greedy: identical to the uninterrupted in-process run


@pytest.mark.slow
@pytest.mark.skipif(not has_module("ray"), reason="Ray not installed (fastvlm[batch])")
def test_ray_matches_local_processes(images40, reference, tmp_path):
    local, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    r = cli(str(images40), str(local), "--workers", "2", "--max-tokens", str(TOKENS), "-q")
    assert r.returncode == 0, r.stderr
    r = cli(str(images40), str(ray_out), "--ray", "--workers", "2", "--max-tokens", str(TOKENS))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["done"] == 40 and summary["backend"] == "ray"
    assert len(rows(ray_out)) == 40
    assert texts(ray_out) == texts(local) == reference


# ---------------------------------------------------------------------- bad rows, exit codes
def summary(r: subprocess.CompletedProcess) -> dict:
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bad_manifest_rows_are_error_rows_and_the_job_goes_on(tmp_path):
    paths = make_images(tmp_path / "imgs", 2)
    jl = tmp_path / "m.jsonl"
    jl.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "image": f"imgs/{paths[0].name}"}),
                "{not json",  # a non-JSON line
                json.dumps({"id": "no-image", "prompt": "hi"}),  # a row without `image`
                json.dumps({"id": "a", "image": f"imgs/{paths[1].name}"}),  # a duplicated id
                json.dumps(["a", "list"]),  # JSON, but not an object
                json.dumps({"id": "nul", "image": "imgs/x\x00.png"}),  # a NUL byte in the path
                json.dumps({"id": "num", "image": 12}),  # not a path
                json.dumps({"id": "b", "image": f"imgs/{paths[1].name}"}),
            ]
        )
        + "\n"
    )
    items = load_items(jl, PROMPT)
    assert len(items) == 8
    assert [it["id"] for it in items if "error" not in it] == ["a", "b"]
    errors = {it["id"]: it["error"] for it in items if "error" in it}
    assert "not valid JSON" in errors["row 2"]
    assert "no 'image'" in errors["no-image (row 3)"]
    assert "already used by row 1" in errors["a (row 4)"]
    assert "got list" in errors["row 5"]
    assert "NUL" in errors["nul (row 6)"]
    assert "path string" in errors["num (row 7)"]
    out = tmp_path / "out.jsonl"
    s = run(jl, out, PROMPT, workers=0, sampling={"max_tokens": 2}, progress=False)
    assert s["done"] == 2 and s["failed"] == 6 and s["total"] == 8
    assert len(rows(out)) == 8 and "not valid JSON" in s["first_error"]
    s = run(jl, out, PROMPT, workers=0, sampling={"max_tokens": 2}, progress=False)
    assert s["skipped"] == 8 and s["done"] == s["failed"] == 0  # rerun: nothing redone
    assert len(rows(out)) == 8


def test_csv_with_bom_and_ragged_rows(tmp_path):
    paths = make_images(tmp_path / "imgs", 2)
    cs = tmp_path / "m.csv"
    body = f"image,id\nimgs/{paths[0].name},a\n,b\nimgs/{paths[1].name},c,extra\n"
    cs.write_bytes(b"\xef\xbb\xbf" + body.encode())  # Excel's UTF-8 BOM
    items = load_items(cs, PROMPT)
    assert [it["id"] for it in items] == ["a", "b (row 2)", "c (row 3)"]
    assert items[0]["image"] == str(tmp_path / "imgs" / paths[0].name)
    assert "no 'image'" in items[1]["error"] and "more cells" in items[2]["error"]
    nohdr = tmp_path / "nohdr.csv"
    nohdr.write_text("path,id\nx.png,1\n")
    with pytest.raises(FastVLMError, match="'image' column"):
        load_items(nohdr, PROMPT)


def test_parquet_rows_with_null_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = make_images(tmp_path / "imgs", 1)
    pqf = tmp_path / "m.parquet"
    image = [
        {"bytes": paths[0].read_bytes(), "path": None},
        {"bytes": None, "path": None},  # a null image
        None,  # a null struct
        {"bytes": b"", "path": None},  # empty bytes
        {"bytes": b"\x00" * 64, "path": None},  # null bytes: not an image
    ]
    pq.write_table(pa.table({"id": ["ok", "n1", "n2", "empty", "zeros"], "image": image}), pqf)
    items = load_items(pqf, PROMPT)
    assert [("error" in it) for it in items] == [False, True, True, True, False]
    out = tmp_path / "pq.jsonl"
    s = run(pqf, out, PROMPT, workers=0, sampling={"max_tokens": 2}, progress=False)
    assert s["done"] == 1 and s["failed"] == 4
    got = {r["id"]: r for r in rows(out)}
    assert "text" in got["ok"] and "error" in got["zeros"]  # zero bytes: fails when decoded


@pytest.mark.parametrize("k", ["5", "64", "0", "1073741824"])
def test_tokens_per_image_is_checked_against_the_model_before_any_work(tmp_path, k):
    make_images(tmp_path / "imgs", 2)
    out = tmp_path / "o.jsonl"
    r = cli(str(tmp_path / "imgs"), str(out), "-q", "--workers", "0", "--tokens-per-image", k)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr) < 300 and "16, 9, 4, 1" in r.stderr, r.stderr[:500]
    assert not out.exists() or not out.read_text()


def test_exit_codes_all_ok_partial_all_failed(tmp_path):
    paths = make_images(tmp_path / "imgs", 2)
    common = ["-q", "--workers", "0", "--max-tokens", "2"]
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps({"image": str(p)}) + "\n" for p in paths))
    r = cli(str(ok), str(tmp_path / "o1.jsonl"), *common)
    assert r.returncode == 0 and summary(r)["failed"] == 0, r.stderr
    part = tmp_path / "part.jsonl"
    part.write_text(ok.read_text() + "{broken\n")
    r = cli(str(part), str(tmp_path / "o2.jsonl"), *common)
    assert r.returncode == 0 and summary(r)["failed"] == 1, r.stderr  # partial: 0, "1 failed"
    assert "failed 1" in r.stderr and "warning: 1 items of this run failed" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{broken\n{"image": "missing.png"}\n')
    r = cli(str(bad), str(tmp_path / "o3.jsonl"), *common)
    assert r.returncode == 1 and summary(r)["failed"] == 2 and summary(r)["done"] == 0
    assert "error: every item of this run failed" in r.stderr and "Traceback" not in r.stderr
    r = cli(str(tmp_path / "imgs"), str(tmp_path / "o4.jsonl"), *common, "--model", "tiny")
    assert r.returncode == 0 and summary(r)["done"] == 2
