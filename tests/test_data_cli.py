"""The data verbs end to end; the bad-file corpus gives one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared
from tunelab.cli import main

BAD = sorted((Path(__file__).parent / "data" / "bad").iterdir())
WHOLE_FILE_BAD = [p for p in BAD if p.name in {"broken.json", "empty.json", "not_a_list.json", "not_utf8.jsonl",
                                               "unsupported.xml", "all_missing.json", "no_known_keys.jsonl"}]


@pytest.mark.parametrize("path", WHOLE_FILE_BAD, ids=lambda p: p.name)
@pytest.mark.parametrize("verb", ["inspect", "clean"])
def test_bad_files_give_one_line_errors(tmp_path, capsys, path, verb):
    args = ["data", verb, str(path)] + (["--out", str(tmp_path / "o.jsonl")] if verb == "clean" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_inspect_clean_split_leakage_weights_verbs(tmp_path, capsys):
    src = shared("instruct", "llamafactory_demo", "alpaca_zh_demo.json")
    html = tmp_path / "inspect.html"
    assert main(["data", "inspect", str(src), "--model", "tiny-random-llama", "--max-length", "256",
                 "--html", str(html), "--json", str(tmp_path / "i.json")]) == 0
    stats = json.loads((tmp_path / "i.json").read_text())[0]
    assert stats["rows"] == 1000 and stats["exact_duplicates"] == 8 and stats["languages"]["zh"] > 0.9
    assert 0 < stats["over_max_length"] < 1 and stats["tokens"]["assistant"]["p99"] > stats["tokens"]["user"]["p50"]
    assert html.read_text().count("data:image/png;base64") >= 2
    out = tmp_path / "clean.json"
    assert main(["data", "clean", str(src), "--out", str(out), "--pii"]) == 0
    assert len(json.loads(out.read_text())) == 992  # the 8 exact duplicates removed, same format (.json list)
    assert main(["data", "split", str(out), "--out-dir", str(tmp_path / "s"), "--ratios", "0.8,0.2"]) == 0
    assert main(["data", "leakage", str(tmp_path / "s" / "train.json"), str(tmp_path / "s" / "val.json"), "--fail"]) == 0
    assert main(["data", "leakage", str(src), str(src), "--fail"]) == 1
    sst = shared("classification", "sst2", "train.jsonl")
    assert main(["data", "weights", str(sst), "--out", str(tmp_path / "w.jsonl")]) == 0
    weights = {r["label"]: r["weight"] for r in map(json.loads, (tmp_path / "w.jsonl").read_text().splitlines())}
    assert weights[0] > 1 > weights[1]  # SST-2 here has fewer negatives
    assert main(["data", "split", str(sst), "--out-dir", str(tmp_path / "x"), "--ratios", "0.5,0.6"]) == 2
    assert "--ratios" in capsys.readouterr().err


def _two_arrays(tmp_path: Path) -> tuple[Path, int]:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(25)]
    head = json.dumps(rows[:5])
    path = tmp_path / "data.json"
    path.write_text(head + json.dumps(rows[5:]))
    return path, len(head.encode())


@pytest.mark.parametrize("verb", ["inspect", "clean", "split"])
def test_data_verbs_refuse_a_json_file_with_two_arrays(tmp_path, capsys, verb):
    path, at = _two_arrays(tmp_path)
    out = {"inspect": [], "clean": ["--out", str(tmp_path / "o.jsonl")], "split": ["--out-dir", str(tmp_path / "s")]}
    assert main(["data", verb, str(path), *out[verb]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    assert f"data.json: unexpected data after the JSON array at byte {at}" in err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "s").exists()


def test_clean_moves_a_broken_json_line_to_the_removed_file(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    good = [json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) for i in range(4)]
    path.write_text("\n".join(good[:2] + ['{"instruction": "x", oops'] + good[2:]) + "\n")
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(path), "--out", str(out), "--no-near"]) == 0
    assert len(out.read_text().splitlines()) == 4
    removed = [json.loads(line) for line in (tmp_path / "clean.removed.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"], r["raw"]) for r in removed] == [(2, "bad_json", '{"instruction": "x", oops')]
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert (report["rows_read"], report["removed_by_reason"], report["steps"]["read"]["removed"]) == (5, {"bad_json": 1}, 1)


def test_augment_puts_a_broken_json_line_in_its_rejects_file(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    good = [json.dumps({"instruction": f"say the words number {i} now", "output": "ok"}) for i in range(3)]
    path.write_text("\n".join([good[0], "{oops", *good[1:]]) + "\n")
    out = tmp_path / "aug.jsonl"
    assert main(["data", "augment", str(path), "--out", str(out), "--ops", "swap"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len([r for r in rows if not r.get("augmented")]) == 3
    rejects = [json.loads(line) for line in (tmp_path / "aug.rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"], r["raw"]) for r in rejects] == [(1, "bad_json", "{oops")]


def _rows_file(tmp_path: Path, n: int = 12, labelled: bool = False) -> Path:
    path = tmp_path / "rows.jsonl"
    rows = ([{"text": f"review number {i} " + "good " * (i % 3), "label": i % 2} for i in range(n)] if labelled
            else [{"instruction": f"question number {i} " + "why " * i, "output": f"answer {i}"} for i in range(n)])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("verb", ["clean", "augment", "weights", "agreement", "inspect-html", "inspect-json"])
def test_data_verbs_refuse_an_existing_output_unless_force(tmp_path, capsys, verb):
    src = _rows_file(tmp_path, labelled=verb == "weights")
    if verb == "agreement":
        src.write_text("".join(json.dumps({"text": f"t{i}", "labels": [i % 2, 1, 1]}) + "\n" for i in range(6)))
    out = tmp_path / ("o.html" if verb == "inspect-html" else "o.json" if verb == "inspect-json" else "o.jsonl")
    out.write_text("the user's own file\n")
    flag = {"inspect-html": "--html", "inspect-json": "--json"}.get(verb, "--out")
    args = ["data", verb.split("-")[0], str(src), flag, str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag}: {out} already exists" in err and "--force" in err and "\n" not in err
    assert out.read_text() == "the user's own file\n"
    assert main([*args, "--force"]) == 0
    assert out.read_text() != "the user's own file\n"


def test_clean_refuses_an_existing_removed_file_unless_force(tmp_path, capsys):
    src = _rows_file(tmp_path)
    removed = tmp_path / "o.removed.jsonl"  # the default removed-rows file of --out o.jsonl
    removed.write_text("keep\n")
    assert main(["data", "clean", str(src), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "o.removed.jsonl already exists" in capsys.readouterr().err
    assert removed.read_text() == "keep\n" and not (tmp_path / "o.jsonl").exists()
    assert main(["data", "clean", str(src), "--out", str(tmp_path / "o.jsonl"), "--force"]) == 0


def test_split_out_dir_that_is_a_file_or_holds_splits_is_a_one_line_error(tmp_path, capsys):
    src = _rows_file(tmp_path)
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    assert main(["data", "split", str(src), "--out-dir", str(a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out-dir:") and "is a file" in err and "\n" not in err and "Traceback" not in err
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("other files are fine")
    assert main(["data", "split", str(src), "--out-dir", str(out), "--group", "none"]) == 0
    train = (out / "train.jsonl").read_text()
    assert main(["data", "split", str(src), "--out-dir", str(out), "--group", "none", "--seed", "1"]) == 2
    assert "already holds split files" in capsys.readouterr().err and (out / "train.jsonl").read_text() == train
    assert main(["data", "split", str(src), "--out-dir", str(out), "--group", "none", "--seed", "1", "--force"]) == 0


@pytest.mark.parametrize(("args", "expected"), [
    (["split", "--out-dir", "S", "--ratios", "0.9,0.9,-0.8"],
     "--ratios: ratios must be 2 or 3 non-negative shares (each >= 0) summing to 1 (got '0.9,0.9,-0.8')"),
    (["split", "--out-dir", "S", "--ratios", "0.9,x"], "--ratios: not a comma-separated list of numbers"),
    (["clean", "--out", "O", "--threshold", "2"], "--threshold: Input should be less than or equal to 1 (got 2.0)"),
    (["clean", "--out", "O", "--min-chars", "-3"], "--min-chars: Input should be greater than or equal to 0 (got -3)"),
    (["augment", "--out", "O", "--copies", "0"], "--copies: Input should be greater than or equal to 1 (got 0)"),
    (["weights", "--out", "O", "--beta", "1"], "--beta: Input should be less than 1 (got 1.0)"),
])
def test_bad_data_verb_options_give_one_line_errors_naming_the_option(tmp_path, capsys, args, expected):
    src = _rows_file(tmp_path, labelled=True)
    args = [str(tmp_path / "x") if a in ("S", "O") else a for a in args]
    assert main(["data", args[0], str(src), *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "pydantic" not in err and "Traceback" not in err
