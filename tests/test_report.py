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


def _preference_run(tmp_path):
    """A DPO run's files as `tunelab train` writes them: pair metrics in every train record (train_*)
    and at every evaluation."""
    run = write_run_files(tmp_path / "runs" / "dpo-lora", steps=4)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        k = rec["step"]
        if rec["kind"] == "train":
            rec.update(train_pair_accuracy=0.25 * k, train_margin=0.1 * k, train_reward_chosen=0.05 * k,
                       train_reward_rejected=-0.05 * k, train_logp_chosen=-80.0, train_logp_rejected=-90.0)
        else:
            rec.update(pair_accuracy=0.5 if k < 4 else 0.875, margin=0.031 if k < 4 else 0.4567,
                       reward_chosen=0.2, reward_rejected=-0.2567, logp_chosen=-81.5, logp_rejected=-95.25)
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_report_and_registry_of_a_preference_run_show_margin_and_pair_accuracy(tmp_path, capsys):
    from rich.console import Console

    from tunelab.cli import main
    from tunelab.eval.runs import print_runs
    from tunelab.rundocs import run_row

    run = _preference_run(tmp_path)
    other = write_run_files(tmp_path / "runs" / "sft-lora")  # an SFT run: no pair metrics anywhere
    assert main(["report", str(run), str(other), "--out", str(tmp_path / "r.html")]) == 0
    page, md = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    assert page.count("<h3>Preference pairs</h3>") == 1 and "### Preference pairs" in md
    section = page[page.index("<h3>Preference pairs</h3>"):]
    section = section[: section.index("<h3>", 5)]
    for alt in ("margin over steps", "pair_accuracy over steps"):
        assert f'<img alt="{alt}" src="data:image/png;base64,' in section
    # the final pair metrics: the last evaluation (step 4) and the last train record
    assert "<td>validation</td><td>4</td><td>87.5%</td><td>0.457</td>" in section
    assert "<td>train (last record)</td><td>4</td><td>100.0%</td><td>0.400</td>" in section
    assert "-95.250" in section and "reward_chosen" in section and "score_chosen" not in section
    # the runs table: pair accuracy beside the losses, "-" for the SFT run
    runs_table = page[page.index("<h2>Runs</h2>"):]
    runs_table = runs_table[: runs_table.index("<h2>", 5)]
    assert "<th>pair_accuracy</th>" in runs_table and "87.5%" in runs_table

    row, sft = run_row(run), run_row(other)
    assert row["pair_accuracy"] == 0.875 and row["margin"] == 0.4567 and row["pair_metrics_from"] == "eval step 4"
    assert "pair_accuracy" not in sft
    capsys.readouterr()
    print_runs([row, sft], Console(width=300))
    out = capsys.readouterr().out
    assert "pair_accuracy" in out and "0.875" in out
    print_runs([sft], Console(width=300))
    assert "pair_accuracy" not in capsys.readouterr().out
