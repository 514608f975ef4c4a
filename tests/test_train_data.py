"""One data reader for `fastvlm train` and `fastvlm eval`: the same files (LLaVA .json list,
.jsonl, Excel CSVs with a BOM / CRLF / ';', UTF-16, TSV, extra or aliased columns) are accepted
by both; bad rows are reported with their line, bad files are one `error:` line (exit 1, never a
traceback); multi-turn rows are scored turn by turn with the reference history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fastvlm.cli import main as cli_main
from fastvlm.train.data import load_records
from fastvlm.train.evaluate import examples_from_records

# (image, question, answer, type): the same four rows written in every format below
ROWS = [
    ("red.png", "What color is it?", "red", "color"),
    ("blue.png", "What color, exactly?", "blue", "color"),
    ("red.png", 'Say "hi"; then stop', "hi", "qa"),
    ("", "Text only: 2+2?", "4", "qa"),
]


def images(folder: Path) -> None:
    for c in ("red", "blue"):
        Image.new("RGB", (40, 30), c).save(folder / f"{c}.png")


def conv_row(img: str, q: str, a: str, t: str) -> dict:
    human = f"<image>\n{q}" if img else q
    row = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": a}]}
    return {**({"image": img} if img else {}), **row, "type": t}


def csv_text(delim: str = ",", header: str = "image,question,answer,type") -> str:
    def cell(v: str) -> str:
        return f'"{v.replace(chr(34), 2 * chr(34))}"' if any(c in v for c in f'"{delim}') else v

    lines = [header.replace(",", delim)]
    lines += [delim.join(cell(v) for v in row) for row in ROWS]
    return "\n".join(lines) + "\n"


def write_variant(folder: Path, kind: str) -> Path:
    """The ROWS dataset in format `kind`."""
    images(folder)
    if kind == "json-list":
        p = folder / "d.json"
        p.write_text(json.dumps([conv_row(*r) for r in ROWS], indent=2))
    elif kind == "jsonl":
        p = folder / "d.jsonl"
        p.write_text("\n".join(json.dumps(conv_row(*r)) for r in ROWS) + "\n")
    elif kind == "jsonl-qa-crlf-bom":
        p = folder / "d.jsonl"
        lines = [json.dumps(dict(zip(("image", "question", "answer", "type"), r))) for r in ROWS]
        p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    elif kind == "csv-bom":  # Excel "CSV UTF-8"
        p = folder / "d.csv"
        p.write_bytes(b"\xef\xbb\xbf" + csv_text().encode())
    elif kind == "csv-crlf":
        p = folder / "d.csv"
        p.write_bytes(csv_text().replace("\n", "\r\n").encode())
    elif kind == "csv-semicolon-bom-crlf":  # Excel in a ';' locale
        p = folder / "d.csv"
        p.write_bytes(b"\xef\xbb\xbf" + csv_text(";").replace("\n", "\r\n").encode())
    elif kind == "csv-utf16":  # Excel "Unicode text" saved as .csv
        p = folder / "d.csv"
        p.write_bytes(csv_text().encode("utf-16"))
    elif kind == "tsv":
        p = folder / "d.tsv"
        p.write_text(csv_text("\t"))
    elif kind == "csv-extra-cols-aliases":  # other column order, aliases, case, an extra column
        p = folder / "d.csv"
        text = "Notes, Prompt ,Image_Path,Response,TYPE\n" + "".join(
            f'n{i},"{q.replace(chr(34), 2 * chr(34))}",{img},{a},{t}\n'
            for i, (img, q, a, t) in enumerate(ROWS)
        )
        p.write_text(text)
    else:
        raise AssertionError(kind)
    return p


VARIANTS = ["json-list", "jsonl", "jsonl-qa-crlf-bom", "csv-bom", "csv-crlf",
            "csv-semicolon-bom-crlf", "csv-utf16", "tsv", "csv-extra-cols-aliases"]  # fmt: skip


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_format_gives_the_same_records_and_eval_examples(tmp_path, kind):
    path = write_variant(tmp_path, kind)
    records, report = load_records(path)
    assert not report.bad and report.total == len(ROWS), report.summary()
    examples = examples_from_records(records, report)
    got = [(Path(e["image"]).name if e["image"] else "", e["question"], e["answer"], e["type"])
           for e in examples]  # fmt: skip
    assert got == ROWS


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


@pytest.mark.parametrize("kind", ["json-list", "jsonl", "csv-bom", "csv-crlf", "tsv"])
def test_train_and_eval_accept_the_same_file(tmp_path, tiny_dir, capsys, kind):
    path = write_variant(tmp_path, kind)
    rc, _, err = run_cli(capsys, "train", "--model", str(tiny_dir), "--data", str(path),
                         "-o", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2",
                         "--warmup", "0", "--device", "cpu", "--quiet")  # fmt: skip
    assert rc == 0, err
    assert "4/4 rows usable" in err
    rc, out, err = run_cli(capsys, "eval", "--model", str(tiny_dir), "--data", str(path),
                           "--max-tokens", "2", "--device", "cpu", "--quiet",
                           "-o", str(tmp_path / "pred.jsonl"))  # fmt: skip
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["examples"] == len(ROWS) and summary["errors"] == 0
    assert set(summary["per_type"]) == {"color", "qa"}
    preds = [json.loads(ln) for ln in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert sorted((p["line"], p["answer"]) for p in preds) == sorted(
        (line, r[2]) for line, r in zip([p["line"] for p in sorted(preds, key=lambda p: p["line"])],
                                        ROWS, strict=True))  # fmt: skip


def test_multi_turn_rows_are_scored_per_answer_with_reference_history(tmp_path):
    images(tmp_path)
    turns = ["<image>\nHow many?", "two", "Which colour is left?", "red", "And right?", "blue"]
    row = {"image": "red.png", "conversations": [
        {"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]}
    sys_row = {"conversations": [{"from": "System", "value": "Be short."},  # any case
                                 {"from": "Human", "value": "Hi?"}, {"from": "GPT", "value": "Hi."}]}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps(sys_row) + "\n")
    records, report = load_records(path)
    ex = examples_from_records(records, report)
    assert [(e["line"], e["turn"], e["question"], e["answer"]) for e in ex] == [
        (1, 1, "How many?", "two"), (1, 2, "Which colour is left?", "red"),
        (1, 3, "And right?", "blue"), (2, 1, "Hi?", "Hi."),
    ]  # fmt: skip
    # the prompt of turn 3 holds the reference answers of turns 1-2 and ends on its question
    assert [m["content"] for m in ex[2]["messages"]] == turns[:5]
    assert ex[3]["messages"][0] == {"role": "system", "content": "Be short."}
    two = {"images": ["red.png", "blue.png"], "conversations": [
        {"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "no"}]}
    path.write_text(json.dumps(two) + "\n")
    records, report = load_records(path)
    assert examples_from_records(records, report) == [] and report.bad[0][0] == 1


def bad_file(folder: Path, kind: str) -> tuple[Path, str]:
    """(file, what the single error line must say) for files no row can be read from."""
    images(folder)
    if kind == "empty-jsonl":
        (p := folder / "d.jsonl").write_text("")
        return p, "is empty"
    if kind == "empty-json":
        (p := folder / "d.json").write_text("  \n")
        return p, "is empty"
    if kind == "bom-only-csv":
        (p := folder / "d.csv").write_bytes(b"\xef\xbb\xbf\r\n")
        return p, "is empty"
    if kind == "json-object":
        (p := folder / "d.json").write_text(json.dumps({"data": [conv_row(*ROWS[0])]}))
        return p, "a JSON object"
    if kind == "jsonl-named-json":
        (p := folder / "d.json").write_text("\n".join(json.dumps(conv_row(*r)) for r in ROWS))
        return p, "name the file .jsonl"
    if kind == "csv-latin1":
        (p := folder / "d.csv").write_bytes("image,question,answer\nred.png,Qué?,rojo\n"
                                           .encode("latin-1"))  # fmt: skip
        return p, "line 2: not UTF-8"
    if kind == "csv-missing-column":
        (p := folder / "d.csv").write_text("image,question\nred.png,What?\n")
        return p, "missing ['answer']"
    if kind == "json-broken":
        (p := folder / "d.json").write_text('[\n {"image": "red.png"},\n {"image": \n]')
        return p, "line 4 column 1: invalid JSON (Expecting value) in the row that starts on line 3"
    if kind == "all-rows-bad":
        (p := folder / "d.jsonl").write_text('{"image": "gone.png", "question": "Q", '
                                             '"answer": "A"}\n{broken\n')  # fmt: skip
        return p, "no "
    if kind == "csv-header-only":
        (p := folder / "d.csv").write_text("image,question,answer\r\n")
        return p, "no "
    if kind == "csv-huge-field":
        (p := folder / "d.csv").write_text('image,question,answer\nred.png,"' + "x" * 200_000
                                           + '",red\n')  # fmt: skip
        return p, "line 2: unreadable table"
    if kind == "unknown-suffix":
        (p := folder / "d.txt").write_text("image,question,answer\n")
        return p, "unsupported"
    raise AssertionError(kind)


BAD_FILES = ["empty-jsonl", "empty-json", "bom-only-csv", "json-object", "jsonl-named-json",
             "csv-latin1", "csv-missing-column", "json-broken", "all-rows-bad",
             "csv-header-only", "csv-huge-field", "unknown-suffix"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("tool", ["train", "eval"])
def test_unreadable_files_are_one_error_line_in_train_and_eval(tmp_path, tiny_dir, capsys,
                                                                kind, tool):  # fmt: skip
    path, says = bad_file(tmp_path, kind)
    extra = ["-o", str(tmp_path / "out"), "--max-steps", "1"] if tool == "train" else []
    rc, _, err = run_cli(capsys, tool, "--model", str(tiny_dir), "--data", str(path),
                         "--device", "cpu", "--quiet", *extra)  # fmt: skip
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(errors) == 1, err
    assert says in errors[0], errors[0]


def test_bad_rows_are_reported_with_their_line_and_the_rest_is_used(tmp_path, tiny_dir, capsys):
    images(tmp_path)
    good = [json.dumps(conv_row(*r)) for r in ROWS[:2]]
    lines = [
        good[0],  # 1
        '{"image": "red.png", "conversations": [',  # 2 broken JSON
        json.dumps(conv_row("missing.png", "Q?", "A", "qa")),  # 3 image file missing
        "",  # 4 blank
        good[1],  # 5
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"question": "caf\xe9?"}\n')  # 6
    late = {"image": "blue.png", "conversations": [  # image shown only in the second question
        {"from": "human", "value": "Ready?"}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]}
    path.write_bytes(path.read_bytes() + json.dumps(late).encode() + b"\n")  # 7
    for tool in ("train", "eval"):
        extra = ["-o", str(tmp_path / "out"), "--max-steps", "1", "--warmup", "0",
                 "--batch-size", "2"] if tool == "train" else ["--max-tokens", "2"]  # fmt: skip
        rc, out, err = run_cli(capsys, tool, "--model", str(tiny_dir), "--data", str(path),
                               "--device", "cpu", "--quiet", *extra)  # fmt: skip
        assert rc == 0, err
        assert "3/6 rows usable, 3 skipped" in err, err
        assert "line 2: bad JSON" in err and "line 3: image not found" in err
        assert "line 6: not UTF-8" in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["examples"] == 4 and summary["skipped_rows"] == 3 and summary["errors"] == 0
    rc, _, err = run_cli(capsys, "eval", "--model", str(tiny_dir), "--data", str(path),
                         "-o", str(tmp_path / "no" / "such" / "dir.jsonl"))  # fmt: skip
    assert rc == 1 and "its folder does not exist" in err
    # a row longer than the model's context is one error row of the results, not a crash
    long = {"question": "How many? " * 400, "answer": "3", "image": "red.png"}
    path.write_text(json.dumps(conv_row(*ROWS[0])) + "\n" + json.dumps(long) + "\n")
    rc, out, err = run_cli(capsys, "eval", "--model", str(tiny_dir), "--data", str(path),
                           "--device", "cpu", "--quiet", "--max-tokens", "2")  # fmt: skip
    summary = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and summary["examples"] == 2 and summary["errors"] == 1, err
    bad_csv = tmp_path / "c.csv"
    bad_csv.write_text("image,question,answer\nred.png,What color, red or blue?,red\n"
                       "blue.png,What?,blue\nred.png,,\n")  # fmt: skip
    records, report = load_records(bad_csv)
    assert [r.line for r in records] == [3]
    assert [n for n, _ in report.bad] == [2, 4] and "unquoted ','" in report.bad[0][1]
