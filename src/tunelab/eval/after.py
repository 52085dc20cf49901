"""What the ``eval:`` config section asks for once training has written ``final/``.

Above the modules it runs in turn (so none of them imports another to chain the steps):
:func:`tunelab.eval.evaluate.evaluate` on the section's data and benchmarks,
:func:`tunelab.eval.forgetting.measure_forgetting` (base vs tuned), the report
(:func:`tunelab.report.html.write_report`, which reads only the JSON the others wrote) and
MLflow logging.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tunelab.eval.evaluate import evaluate, request_from_config
from tunelab.eval.forgetting import measure_forgetting
from tunelab.eval.tracking import log_to_mlflow
from tunelab.report.html import write_report

__all__ = ["after_training"]


def after_training(section, run_dir: Path, console: Console | None = None) -> None:
    """Evaluate, measure forgetting, write the report and log to MLflow, as ``section`` (``cfg.eval``) asks."""
    console = console or Console()
    if section.data or section.benchmarks:
        console.rule("[bold]evaluation")
        evaluate(run_dir, request_from_config(section), checkpoint=section.checkpoint, console=console)
    if getattr(section, "forgetting", None) is not None:  # base vs tuned, general vs task (eval/forgetting.py)
        console.rule("[bold]forgetting")
        measure_forgetting(run_dir, checkpoint=section.checkpoint, dtype=section.dtype, console=console)
    if section.report:
        html_path, md_path = write_report([run_dir])
        console.print(f"report: {html_path} ({md_path})")
    if section.mlflow:
        rid = log_to_mlflow(run_dir, tracking_uri=section.mlflow_uri, experiment=section.mlflow_experiment)
        console.print(f"MLflow: run {rid} in experiment {section.mlflow_experiment!r}")
