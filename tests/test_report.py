"""`tunelab report`: the page opens with before/after numbers, has every section, and renders
in headless Chromium (skipped with a reason when chromium is not installed: `make setup` installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from eval_fixtures import write_run_files
from tunelab.eval.metrics import classification_metrics

LABELS = ["Export", "Green", "Talent"]


def _demo_workdir(tmp_path):
    """What `tunelab demo` leaves behind, in miniature: a run, results.json, generations.jsonl and evaluations."""
    work = tmp_path / "demo_run"
    run = write_run_files(work / "runs" / "policy-lora", data=str(work / "data" / "train.jsonl"))
    (work / "results.json").write_text(json.dumps({
        "base": {"accuracy": 0.1, "macro_f1": 0.139, "n_unparsed": 83},
        "tuned": {"accuracy": 0.667, "macro_f1": 0.633, "n_unparsed": 0}, "run_dir": str(run)}))
    (work / "generations.jsonl").write_text("".join(json.dumps(
        {"prompt": f"enterprise {i}", "gold": "Green", "base_reply": "I cannot say", "base_label": None,
         "tuned_reply": "Green", "tuned_label": "Green"}) + "\n" for i in range(3)))
    gold = ["Export", "Green", "Talent", "Green"]
    systems = {}
    for name, pred in (("base 0-shot", [None, "Green", None, "Export"]), ("tuned", ["Export", "Green", "Talent", "Talent"])):
        m = {"labels": LABELS, "generated": classification_metrics(gold, pred, LABELS), "primary": "generated"}
        systems[name] = {"description": name, "metrics": m,
                         "headline": {"accuracy": m["generated"]["accuracy"], "macro_f1": m["generated"]["macro_f1"]}}
    (run / "eval").mkdir()
    (run / "eval" / "heldout.json").write_text(json.dumps({"name": "heldout", "task": "classification",
                                                           "source": "test.jsonl", "systems": systems,
                                                           "data": {"evaluated": 4}}))
    (run / "eval" / "heldout.examples.jsonl").write_text("".join(
        json.dumps({"system": s, "id": f"t:{i}", "prompt": f"enterprise {i}", "reference": g,
                    "prediction": f"reply-{s[:4]}-{i}", "score": 1.0}) + "\n"
        for s in systems for i, g in enumerate(gold)))
    bench = {}
    for name, acc in (("base", 0.30), ("tuned", 0.27)):
        bench[name] = {"metrics": {"accuracy": acc, "ci_low": acc - 0.06, "ci_high": acc + 0.07, "n": 200,
                                   "confidence": 0.95, "chance": 0.25, "k_shot": 0,
                                   "per_category": {"STEM": {"accuracy": acc - 0.02, "n": 80},
                                                    "Humanities": {"accuracy": acc + 0.01, "n": 120}}},
                       "headline": {"accuracy": acc, "ci_low": acc - 0.06, "ci_high": acc + 0.07}}
    (run / "eval" / "mmlu-0shot.json").write_text(json.dumps({"name": "mmlu-0shot", "task": "benchmark",
                                                              "source": "mmlu.zip", "systems": bench}))
    (run / "eval" / "compare-a-vs-b-heldout.json").write_text(json.dumps({
        "name": "heldout", "task": "classification", "a": {"name": "a"}, "b": {"name": "b"}, "n": 120,
        "mean_a": 0.55, "mean_b": 0.667, "difference": 0.117, "ci_low": 0.05, "ci_high": 0.18, "p_value": 0.0021,
        "test": "mcnemar-exact", "significant": True, "confidence": 0.95,
        "disagreements": [{"id": "t:7", "reference": "Green", "a": "Export", "b": "Green"}]}))
    return run


def test_report_of_a_demo_run(tmp_path, capsys):
    from tunelab.cli import main

    run = _demo_workdir(tmp_path)
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    first = page.index("<h2>")
    assert page[first:].startswith("<h2>Before vs after</h2>")  # the report opens with the before/after figures
    head = page[first : page.index("<h2>", first + 1)]
    for figure in ("10.0%", "66.7%", "0.139", "0.633", "+56.7 pts", "base (before)", "tuned (after)"):
        assert figure in head, figure
    for section in ("Config and data", "Training curves", "Classification: heldout", "Forgetting: mmlu-0shot",
                    "A/B comparisons", "Sample generations"):
        assert section in page and section in md
    assert page.count("data:image/png;base64,") >= 4  # loss, lr, confusion, per-class F1: embedded
    assert "<script" not in page and "http" not in page.split("</style>")[1]  # self-contained
    assert "mcnemar-exact" in page and "-3.0 pts" in page and "I cannot say" in page
    pngs = sorted((run / "report_files").glob("*.png"))
    assert len(pngs) >= 4 and all(f"report_files/{p.name}" in md for p in pngs)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium not found: `make setup` installs Debian's chromium (apt-get install -y chromium)")


def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    from tunelab.report.html import write_report

    browser = _chromium()
    run = _demo_workdir(tmp_path)
    html_path, _ = write_report([run])
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-500:]
    for figure in ("Before vs after", "66.7%", "10.0%", "mcnemar-exact", "Forgetting: mmlu-0shot"):
        assert figure in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,1400", html_path.as_uri()],
                   capture_output=True, timeout=60, check=True)
    pixels = matplotlib.image.imread(shot)[..., :3]
    ink = (pixels.mean(axis=-1) < 0.9).mean()
    assert pixels.std() > 0.05 and ink > 0.01, (pixels.std(), ink)  # not a blank page
