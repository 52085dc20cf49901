"""``tunelab ui``: a Gradio web workbench over the same entry functions and run directories as the CLI.

The layer beside :mod:`tunelab.cli` (it never imports the CLI, nor the CLI it, except lazily in the
``ui`` verb). Light modules: :mod:`.settings` (the verb's options, the bind/auth rule),
:mod:`.workspace` (paths confined to the workspace), :mod:`.form` (config schema -> form fields ->
YAML, validated by :func:`tunelab.config.load_config`), :mod:`.jobs` (``tunelab train`` subprocesses and
their run directories), :mod:`.labels` (zh / en). :mod:`.app` builds the Gradio app (the ``[ui]`` extra)
and :mod:`.chat` holds the one chat model in memory.
"""
