# make study / make test install what they need into .venv first (again when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
STUDY  ?= studies/smoke.yaml
# One torch release for every machine: the CPU build where there is no CUDA wheel, a CUDA build elsewhere.
TORCH  ?= torch==2.13.0
PORT   ?= 5000
BIN    := $(VENV)/bin

.PHONY: study plan results dashboard test lint clean

study: $(VENV)/.installed
	$(BIN)/hybridscale study $(STUDY)

plan: $(VENV)/.installed
	$(BIN)/hybridscale plan $(STUDY)

results: $(VENV)/.installed
	$(BIN)/hybridscale results $(STUDY)

# The MLflow UI over the local store, on this machine only.
dashboard: $(VENV)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/results/mlflow.db --host 127.0.0.1 --port $(PORT)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "hybridscale needs Python >= 3.11; set PYTHON=python3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache *.egg-info
