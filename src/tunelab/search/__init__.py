"""Search: hyperparameter sweeps (``sweep.py``), base-model selection (``select.py``), and the
strategy advisor with its memory / time estimates (``advise.py``, ``memory.py``)."""
