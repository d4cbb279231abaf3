# xkd: `make demo` trains, distils, explains and writes runs/<name>/report.html; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml

.PHONY: setup demo test test-gpu lint format bench clean

$(BIN)/xkd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e '.[dev,bench,shap]'
	@touch $@

setup: $(BIN)/xkd

demo: setup
	@bash scripts/fashion_mnist.sh
	$(BIN)/xkd run --config $(CONFIG) --overwrite
	@echo "open runs/$$($(BIN)/python -c "import yaml;print(yaml.safe_load(open('$(CONFIG)'))['name'])")/report.html"

test: setup
	$(BIN)/python -m pytest -q

test-gpu: setup
	$(BIN)/python -m pytest -q -m cuda

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: setup
	$(BIN)/python bench/gradcam_bench.py
	$(BIN)/python bench/perturbation_bench.py
	$(BIN)/python bench/dissection_bench.py
	@bash scripts/fashion_mnist.sh
	$(BIN)/python bench/explain_bench.py
	$(BIN)/python bench/train_bench.py --distillers

clean:
	rm -rf $(VENV) runs .pytest_cache
