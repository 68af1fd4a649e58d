# make study / make test install what they need into .venv first (again when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
STUDY  ?= studies/smoke.yaml
SEARCH ?= studies/search.yaml
# One torch release for every machine: the CPU build where there is no CUDA wheel, a CUDA build elsewhere.
TORCH  ?= torch==2.13.0
PORT   ?= 5000
OPTUNA_PORT ?= 8080
BIN    := $(VENV)/bin

.PHONY: study plan results analyze dashboard search optuna-dashboard test lint bench clean

study: $(VENV)/.installed
	$(BIN)/hybridscale study $(STUDY)

plan: $(VENV)/.installed
	$(BIN)/hybridscale plan $(STUDY)

results: $(VENV)/.installed
	$(BIN)/hybridscale results $(STUDY)

# Scaling-law fits, the 8B extrapolation and a report (results/<study>/analysis/report.html).
analyze: $(VENV)/.installed
	$(BIN)/hybridscale analyze $(STUDY)

# The MLflow UI over the local store, on this machine only.
dashboard: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/results/mlflow.db --host 127.0.0.1 --port $(PORT)

# An Optuna search over layer patterns (studies/search.yaml); run it again to continue it.
search: $(VENV)/.installed
	$(BIN)/hybridscale search $(SEARCH)

# optuna-dashboard over the search's Optuna storage, on this machine only.
optuna-dashboard: $(VENV)/.installed
	$(BIN)/hybridscale search $(SEARCH) --dashboard --port $(OPTUNA_PORT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# Benchmarks, each printing ours beside its baseline; JSON lands in results/bench/ and
# figures worth keeping go to bench/RESULTS.md. On any machine: the scaling-law fit with
# 1000 bootstrap resamples and the loader against the trainer. With a GPU, also (about
# 30 min on an H100): training throughput, the SSD kernels against mamba_ssm (its Triton
# files in .vendor/, see bench/ssd_kernels.py), packing, decode and the search.
# bench/data_parallel.py needs two GPUs and runs on its own.
BENCH_OUT := results/bench
HAS_GPU = $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'
bench: $(VENV)/.installed
	mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/analysis_fit.py --out $(BENCH_OUT)/analysis_fit.json
	$(BIN)/python bench/loader.py --out $(BENCH_OUT)/loader.json
	@if $(HAS_GPU); then \
	  $(BIN)/python bench/train_throughput.py --sizes 125m 350m --out $(BENCH_OUT)/throughput.json && \
	  $(BIN)/python bench/ssd_kernels.py --out $(BENCH_OUT)/ssd_kernels.json && \
	  $(BIN)/python bench/packing.py --out $(BENCH_OUT)/packing.json && \
	  $(BIN)/python bench/decode.py --out $(BENCH_OUT)/decode.json && \
	  $(BIN)/python bench/search.py --out $(BENCH_OUT)/search.json; \
	else echo "no GPU here: the GPU benchmarks are skipped"; fi

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "hybridscale needs Python >= 3.11; set PYTHON=python3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache *.egg-info
