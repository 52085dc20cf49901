"""`pip install ARGS` for `make setup`, done by uv where it can be.

    VENV/bin/python tools/fast_install.py ARGS...

uv (PyPI's `uv`, a Rust installer) resolved and installed the ~150 packages of tunelab's [all,dev] extras into a
venv that already had torch in 41 s on this 2-core host, where pip took 92 s, and gave the same `pip freeze`.
It compiles the bytecode, as pip does (11 s without: every first import would then compile it, in each of the
test suite's processes that got there first).
uv reads none of pip's configuration, so this hands it pip's: the index, extra indexes, wheel folders, constraint
files and certificate that `pip config list` shows (including the PIP_* environment), with pip's rule of taking
the best version across all indexes. Torch itself stays pip's (the Makefile installs it first, from this
machine's pip configuration, which is where the CPU build comes from): uv gets the installed build as one more
constraint (e.g. torch==2.13.0+cpu), so it never replaces it; where that conflicts, uv fails and pip runs.

Without uv in the venv, with TUNELAB_PIP_ONLY set, or if uv fails, this runs pip with the same arguments.
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

# pip's options that uv takes under the same name (--cert included), given as flags: uv lets a flag replace, not
# add to, its environment variable, so flags are what keeps both the machine's constraint file and ours
_SHARED = ("index-url", "extra-index-url", "find-links", "constraint", "cert")


def pip_settings(python: str) -> list[str]:
    """pip's effective values of the options uv needs, from every configuration file and the PIP_* environment
    (later sources win, as in pip: `pip config list` prints them in that order), as uv flags."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False).stdout
    settings: dict[str, list[str]] = {}
    for line in out.splitlines():  # e.g. global.extra-index-url='file:///a file:///b'
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in _SHARED and value:
            settings[option] = shlex.split(value)[0].split()
    return [arg for option, values in settings.items() for value in values for arg in (f"--{option}", value)]


def installed_torch_pin(folder: Path) -> list[str]:
    """A constraint file in ``folder`` holding the installed torch build (none if torch is not installed), as uv
    flags."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return []
    pin = folder / "torch.txt"
    pin.write_text(f"torch=={version}\n")
    return ["--constraint", str(pin)]


def main(args: list[str]) -> int:
    python = sys.executable
    uv = Path(python).with_name("uv")
    if uv.is_file() and not os.environ.get("TUNELAB_PIP_ONLY"):
        with tempfile.TemporaryDirectory(prefix="fast-install-") as folder:
            command = [str(uv), "pip", "install", "--quiet", "--python", python, "--compile-bytecode",
                       "--index-strategy", "unsafe-best-match", *pip_settings(python),
                       *installed_torch_pin(Path(folder)), *args]
            if subprocess.run(command, check=False).returncode == 0:
                return 0
        print("fast_install: uv could not install this; pip will", file=sys.stderr)
    return subprocess.run([python, "-m", "pip", "install", "-q", *args], check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
