"""Arms the fault in ``TUNELAB_TEST_FAULT`` in every Python process started with this folder on
``PYTHONPATH`` (see ``tests/faults.py``). Test-only: never on a user's path."""

import os
import sys

if os.environ.get("TUNELAB_TEST_FAULT"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import faults

    faults.install(faults.Fault.parse(os.environ["TUNELAB_TEST_FAULT"]))
