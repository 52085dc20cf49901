"""The import structure of src/tunelab (tools/check_imports.py): no cycles; lazy imports and private
names used across modules only go down from the counts recorded here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Today's counts. Lower them when you fix some (the test fails if they grow, so new code adds none).
MAX_FUNCTION_LEVEL_IMPORTS = 220
MAX_PRIVATE_CROSS_MODULE = 23


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_imports", module)  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles():
    report = _checker().analyse(ROOT / "src")
    assert report.modules > 50
    assert report.cycles == [], "import cycles (layers import downwards only): " + "; ".join(
        " <-> ".join(c) for c in report.cycles)


def test_function_level_imports_do_not_grow():
    report = _checker().analyse(ROOT / "src")
    found = [f"{i.where} {i.module}" for i in report.lazy_imports]
    assert len(found) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(found)} function-level imports that are not of an optional/heavy dependency (at most "
        f"{MAX_FUNCTION_LEVEL_IMPORTS}): move them to the top of the file, or say why on the line:\n" + "\n".join(found))


def test_private_names_across_modules_do_not_grow():
    report = _checker().analyse(ROOT / "src")
    found = [f"{u.where} {u.name}" for u in report.private_uses]
    assert len(found) <= MAX_PRIVATE_CROSS_MODULE, (
        f"{len(found)} private names used across modules (at most {MAX_PRIVATE_CROSS_MODULE}): make them public "
        "or move the code that needs them:\n" + "\n".join(found))


def test_checker_finds_what_it_should(tmp_path):
    pkg = tmp_path / "src" / "tunelab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tunelab.sub import b\n\n_X = 1\n")
    (pkg / "sub" / "b.py").write_text(
        "def f():\n"
        "    import torch\n"
        "    import json\n"
        "    from .. import c  # lazy: c is heavy\n"
        "    from tunelab import a\n"
        "    return a._X\n")
    (pkg / "c.py").write_text("from tunelab.a import _X\nimport tunelab.sub.b\n\nY = tunelab.sub.b._hidden\n")
    report = _checker().analyse(tmp_path / "src")
    assert report.cycles == [["tunelab.a", "tunelab.c", "tunelab.sub.b"]]
    assert sorted(i.module for i in report.lazy_imports) == ["json", "tunelab.a"]
    assert sorted(u.name for u in report.private_uses) == ["tunelab.a._X", "tunelab.a._X", "tunelab.sub.b._hidden"]


def test_command_line_exit_status():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "check_imports.py"), "--summary"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 import cycle(s)" in done.stdout


def test_the_task_registry_matches_the_config_schema():
    """Every name `task:` accepts has a task module, and every registered task can be configured."""
    import typing

    from tunelab.config import TuneConfig
    from tunelab.tasks import TASKS

    accepted = set(typing.get_args(TuneConfig.model_fields["task"].annotation))
    assert accepted == set(TASKS)
    for name, task in TASKS.items():
        assert task.name == name
        for fact in ("causal_lm_rows", "always_packed", "class_head", "labelled", "continual", "unused_parameters",
                     "builds_without_data"):
            assert isinstance(getattr(task, fact), bool), (name, fact)


def test_no_task_switch_outside_the_task_modules():
    """Code that depends on the task reads its facts; only tasks/ knows task names."""
    import ast

    found = []
    for path in (ROOT / "src" / "tunelab").rglob("*.py"):
        if "tasks" in path.relative_to(ROOT / "src" / "tunelab").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "task"):
                continue
            names = [c for c in node.comparators for c in ([c] if isinstance(c, ast.Constant) else
                                                           getattr(c, "elts", []))]
            if any(isinstance(c, ast.Constant) and isinstance(c.value, str) for c in names):  # x.task == "name"
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], found

