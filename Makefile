# Two commands on a fresh machine:
#   make demo   set up .venv and run the embedded default (configs/demo.yaml) end to end
#   make test   set up .venv and run the whole test suite (what CI runs; one process: on 2 cores parallel
#               workers only make the ranks the tests start compete, see docs/testing.md)
#   make test-fast   the quick tier: unit tests only, no processes started (for the edit-test loop)
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

# setup byte-compiles the venv once, on every core (~80 s on 2 cores; pip's own compile is serial, ~2 min).
# Without it every process compiles torch, transformers and DeepSpeed again (import 16 s instead of 6.6 s)
# wherever the interpreter may not write __pycache__ (PYTHONDONTWRITEBYTECODE=1 is set on these machines): the
# reason CI took 2,002 s with --no-compile alone. Not compiled: the optional packages only a few test processes
# import (W&B, MLflow and its OpenTelemetry/Databricks clients, lm-eval); they compile in memory when imported.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --no-compile torch==2.13.0          # FIRST and pinned: deepspeed would pull a CUDA build
	$(PIP) install --quiet --no-compile -e '.[dev]'
	$(PY) -m compileall -q -j 0 -x 'py312_intrinsics|/(wandb|mlflow|opentelemetry|databricks|lm_eval)/' \
	  .venv/lib/python*/site-packages prefpretrain >/dev/null \
	  || echo "setup: some files were not byte-compiled (they compile when imported)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m prefpretrain run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not dist and not slurm and not cli" tests

lint: $(STAMP)
	$(PY) -m ruff check prefpretrain tests bench

clean:
	rm -rf runs data/stdlib_pep8 .cache
