"""The warm server (tests/warm.py) runs a command as a new interpreter would: the same exit code and output, in
its working directory and environment. Its standard input, signals, file size limit and faults are exercised by
the tests that use them (test_cli's chat, test_faults' chain of Ctrl-Cs and deaths, its full disk)."""

from __future__ import annotations

import os
import subprocess
import sys

import warm


def test_a_warm_command_answers_as_a_new_interpreter_does(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {path: tiny-random-llama}\ntrain: {lr: fast}\n")
    env = {**os.environ, "COLUMNS": "200"}
    for args in (["train", "c.yaml"], ["train", "missing.yaml"], ["--version"], ["no-such-verb"]):
        cold = subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
        hot = warm.run(args, cwd=tmp_path, env=env, timeout=120)
        assert (hot.returncode, hot.stdout, hot.stderr) == (cold.returncode, cold.stdout, cold.stderr), args

