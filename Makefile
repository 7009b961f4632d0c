# rsseg — two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and
# installs torch (through TORCH_SPEC, a CPU wheel by default) and the project with its test extras.
#
#   make demo                     the noise-ablation sweep on the built-in synthetic data, the tables, and the best
#                                 run's class map of one built-in scene (GeoTIFF + PNG in tables/prediction/)
#   make test                     the whole test suite (real Ray, real MLflow; 45-55 min on 2 cores)
#   make test-fast                without the slow end-to-end tests
#   make tables                   Tables 1-5 and Figs 9-10 from MLflow into tables/ (Markdown, LaTeX, CSV, PNG)
#   make ui                       the MLflow UI on the work directory's store
#   make bench                    benchmarks, appended to docs/benchmarks.md
#   make eval-smoke               the method's evidence on the synthetic data (3 seeds), appended there too
#
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"; first on a GPU
# machine: python bench/gpu_check.py (docs/gpu.md)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin
TORCH_KEY := $(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(TORCH_KEY)

.PHONY: venv demo test test-fast tables ui bench eval-smoke lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[test]" $(TORCH_SPEC)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/platform sweep sweeps/noise_ablation.yaml --profile smoke
	$(BIN)/platform tables --out tables
	$(BIN)/platform predict best:noise_ablation dataset:0 --out tables/prediction --quicklook --overwrite

tables: $(STAMP)
	$(BIN)/platform tables --out tables

ui: $(STAMP)
	$(BIN)/platform ui

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/data_read.py
	$(BIN)/python bench/pretrain_throughput.py
	$(BIN)/python bench/extraction_cost.py
	$(BIN)/python bench/ft_params.py
	$(BIN)/python bench/cache_cost.py
	$(BIN)/python bench/predict_scale.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/host_syncs.py
	$(BIN)/python bench/repro_kernels.py --append

eval-smoke: $(STAMP)
	$(BIN)/python bench/eval_smoke.py

lint: $(STAMP)
	$(BIN)/python -m compileall -q platform baselines tests bench

clean:
	rm -rf $(VENV) rsseg-work tables viz
