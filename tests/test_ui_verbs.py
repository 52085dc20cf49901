"""The web UI's Data, Evaluate, Export and Runs-compare forms: the CLI's verbs (same options models, same
functions) with their paths confined to the workspace; the Train tab's sample preview with its loss mask."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import VERBS
from tunelab.errors import UserError
from tunelab.fsutil import sha256_file
from tunelab.ui.workspace import Workspace

pytest.importorskip("gradio", reason="the [ui] extra (gradio) is not installed: pip install 'tunelab[ui]'")

from tunelab.ui import app, form, train_tab  # noqa: E402 - after the skip: app imports pandas / gradio lazily only


def _call(ws: Workspace, key: str, **values):
    """Fill the verb's form with ``values`` (the rest left as shown) and press its button."""
    specs = app.verb_fields(VERBS[key].options)
    shown = {name: form.shown_value(spec) for name, spec, _default in specs}
    shown.update(values)
    options = app.parse_verb_options(ws, key, VERBS[key].options, specs, [shown[name] for name, _, _ in specs])
    printed, result = app.run_verb(VERBS[key], options)
    return printed, result, app.result_table(ws, key, result)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tunelab.config import load_config
    from tunelab.train.recipe import fine_tune

    root = tmp_path_factory.mktemp("ws")
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in range(6) for b in range(6)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg, sources = load_config(None, base={
        "run": {"name": "a", "output_dir": str(root / "runs")}, "model": {"path": "tiny-random-llama"},
        "data": {"train": [{"path": str(root / "d.jsonl")}], "max_length": 64},
        "method": {"name": "lora", "r": 4}, "train": {"max_steps": 3, "lr": 2e-3, "precision": "fp32"}})
    fine_tune(cfg, sources)
    return Workspace(root)


def test_data_verbs_write_new_files_and_never_overwrite(workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    printed, result, _ = _call(workspace, "data inspect", target="d.jsonl")
    assert "36" in printed and isinstance(result, list | tuple)
    _, split, _ = _call(workspace, "data split", input="d.jsonl", out_dir="splits")
    assert (workspace.root / "splits").is_dir() and sum(1 for _ in (workspace.root / "splits").iterdir()) >= 2, split
    _, cleaned, _ = _call(workspace, "data clean", input="d.jsonl", out="clean.jsonl")
    assert cleaned["rows_read"] == 36 and (workspace.root / "clean.jsonl").is_file()
    with pytest.raises(UserError, match="clean.jsonl already exists"):
        _call(workspace, "data clean", input="d.jsonl", out="clean.jsonl")
    with pytest.raises(UserError, match=r"^data clean --input: '../d.jsonl' contains '..'"):
        _call(workspace, "data clean", input="../d.jsonl", out="x.jsonl")
    with pytest.raises(UserError, match=r"^data split --ratios: "):
        _call(workspace, "data split", input="d.jsonl", out_dir="s2", ratios="0.9,0.9")


def test_export_lists_its_files_with_their_checksums(workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    printed, result, table = _call(workspace, "export", target="runs/a", out="exported")
    assert "SHA256SUMS" in printed
    files = dict(zip(table["file"], table["sha256"], strict=True))
    assert files and all(sha256_file(workspace.root / "exported" / f) == h for f, h in files.items())


def test_runs_tab_significance_is_tunelab_compare(workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    assert app.shared_eval_data(workspace, ["runs/a"]) == ""  # no data.eval in the config: the user picks a file
    printed = app.significance(workspace, VERBS, ["runs/a", "tiny-random-llama"], "d.jsonl", 12)
    assert "A/B on d (12 paired examples" in printed and "not significant at the 0.05" in printed, printed
    assert "Loading weights" not in printed  # progress bars (carriage-return lines) are left out
    assert (workspace.root / "runs" / "a" / "eval" / "compare-a-vs-tiny-random-llama-d.json").is_file()
    with pytest.raises(UserError, match="pick exactly two runs"):
        app.significance(workspace, VERBS, ["runs/a"], "d.jsonl", 12)


def test_preview_marks_the_tokens_that_get_a_loss(workspace):
    shown = train_tab.preview(workspace, ["d.jsonl"], "tiny-random-llama", "auto", "assistant", 64)
    assert shown[0] == ("d.jsonl: format alpaca\n", "info")
    targets = [text for text, kind in shown if kind == "loss"]
    assert len(targets) == 3 and targets[0].startswith("0")  # the first reply, "0", and its end of turn
    assert any("Add 0 and 0." in text for text, kind in shown if kind is None)


def test_evaluate_shows_the_metrics_table_and_the_confusion_matrix(workspace, monkeypatch):
    monkeypatch.chdir(workspace.root)
    rows = [{"text": f"review {i} was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    (workspace.root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    printed, result, table = _call(workspace, "eval", target="runs/a", data="cls.jsonl", out="eval-cls")
    written = json.loads((workspace.root / "eval-cls" / "cls.json").read_text())
    metrics = written["systems"]["tuned"]["metrics"]  # generative classification: constrained and generated
    shown = {(r.system, r.metric): r.value for r in table.itertuples()}
    assert shown[("tuned", "constrained.accuracy")] == pytest.approx(metrics["constrained"]["accuracy"], rel=1e-3)
    assert shown[("tuned", "generated.macro_f1")] == pytest.approx(metrics["generated"]["macro_f1"], abs=1e-4)
    confusion = app.confusion_table(result)
    assert list(confusion.columns[1:3]) == metrics["labels"] and confusion.shape[0] == len(metrics["labels"])
    assert confusion.iloc[:, 1:].to_numpy().sum() == 8  # every row counted once
