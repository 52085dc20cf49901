"""A core install (no extras) imports and trains; each verb that needs an extra says which, in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tunelab.errors import UserError, require

ROOT = Path(__file__).resolve().parents[1]
# The packages of the extras (serve, sweep, data, report, qlora, mlflow, tensorboard, postgres, gguf).
EXTRAS = ("fastapi", "starlette", "uvicorn", "prometheus_client", "optuna", "matplotlib", "jieba", "datasketch",
          "bitsandbytes", "mlflow", "tensorboard", "psycopg2", "llama_cpp")


def _missing(monkeypatch, *names: str) -> None:
    """Make ``import NAME`` fail as if the package were not installed."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_require_says_which_extra(monkeypatch):
    _missing(monkeypatch, "optuna")
    with pytest.raises(UserError) as err:
        require("optuna", extra="sweep")
    assert _one_line(err) == "tunelab sweep needs optuna: pip install 'tunelab[sweep]'"
    assert require("json", extra="sweep").dumps([]) == "[]"


def test_sweep_without_optuna(monkeypatch):
    from tunelab.search import sweep

    _missing(monkeypatch, "optuna")
    with pytest.raises(UserError) as err:
        sweep.sweep(None)  # fails before it reads the config
    assert _one_line(err) == "tunelab sweep needs optuna: pip install 'tunelab[sweep]'"


def test_serve_without_fastapi_or_prometheus(monkeypatch):
    from tunelab.ship import serve

    for name, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("prometheus_client", "prometheus-client")):
        with monkeypatch.context() as mp:
            _missing(mp, name)
            with pytest.raises(UserError) as err:
                serve.serve(["no-model-is-loaded"], serve.ServeSettings())
            assert _one_line(err) == f"tunelab serve needs {package}: pip install 'tunelab[serve]'"
            with pytest.raises(UserError):
                serve.create_app({}, serve.ServeSettings())


def test_report_without_matplotlib(monkeypatch, tmp_path):
    from tunelab.report.html import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: tiny-random-llama}\n")
    _missing(monkeypatch, "matplotlib")
    with pytest.raises(UserError) as err:
        write_report([run])
    assert _one_line(err) == "tunelab report needs matplotlib: pip install 'tunelab[report]'"
    assert not (run / "report.html").exists()


def test_data_dedup_without_datasketch(monkeypatch):
    from tunelab.data.dedup import NearDupIndex

    _missing(monkeypatch, "datasketch")
    with pytest.raises(UserError) as err:
        NearDupIndex(0.8)
    message = _one_line(err)
    assert "tunelab data dedup" in message and message.endswith("needs datasketch: pip install 'tunelab[data]'")


def test_data_augment_and_inspect_without_jieba_or_matplotlib(monkeypatch):
    from tunelab.data.augment import words_of
    from tunelab.report import plots

    _missing(monkeypatch, "jieba", "matplotlib")
    assert words_of("plain English text") == (["plain", "English", "text"], " ")  # needs no jieba
    with pytest.raises(UserError) as err:
        words_of("这是一个中文句子")
    assert _one_line(err).endswith("needs jieba: pip install 'tunelab[data]'")
    with pytest.raises(UserError) as err:
        plots.pyplot(verb="tunelab data inspect --html", extra="data")
    assert _one_line(err) == "tunelab data inspect --html needs matplotlib: pip install 'tunelab[data]'"


BLOCK = textwrap.dedent(f"""
    import sys
    BLOCKED = {EXTRAS!r}
    for name in BLOCKED:  # ``import NAME`` fails, ``importlib.util.find_spec(NAME)`` is None: not installed
        sys.modules[name] = None
""")


def _core_python(code: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=kw.pop("cwd", ROOT), env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_every_module_imports_without_the_extras():
    done = _core_python("""
        import importlib, pkgutil, tunelab
        names = [m.name for m in pkgutil.walk_packages(tunelab.__path__, "tunelab.")]
        for name in names:
            importlib.import_module(name)
        assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED]
        print(len(names), "modules")
    """)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_train_without_the_extras(tmp_path, alpaca_path):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path, alpaca_path, train={"max_steps": 2, "lr": 1e-3})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    done = _core_python("""
        from tunelab.cli import main
        code = main(["train", "tiny.yaml"])
        assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED]
        sys.exit(code)
    """, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["step"] == 2
