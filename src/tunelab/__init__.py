"""tunelab: a workbench for fine-tuning large language models on your own data and hardware."""

__version__ = "0.1.0"
