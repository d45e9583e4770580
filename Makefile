VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.trainbench-installed
SUITE ?= suites/smoke.yaml

.PHONY: setup bench test clean wheelhouse gpu-check gpu-check-dry

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/base.txt requirements/frameworks.txt scripts/setup_env.sh
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/setup_env.sh
	touch $@

# Runs the default suite end to end and writes the HTML report.
bench: setup
	$(BIN)/bench run $(SUITE)
	$(BIN)/bench report results/$$($(BIN)/python -c "import yaml,sys; print(yaml.safe_load(open('$(SUITE)'))['name'])")

test: setup
	$(BIN)/python -m pytest

# The offline GPU machine's wheels (.whl/, < 56 MiB) and the prepared device check (docs/gpu.md).
wheelhouse: setup
	PY=$(BIN)/python bash scripts/build_wheelhouse.sh

gpu-check:
	bash scripts/gpu_check.sh

gpu-check-dry: setup
	DEVICE=cpu bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) reports .pytest_cache
