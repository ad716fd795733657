# Two entry points on a fresh machine with Python 3.11:
#   make demo   set up .venv, then run the whole job on the embedded default (CPU)
#   make test   set up .venv, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/bsgal data synth data/builtin --seed 0
	$(BIN)/bsgal config show --config configs/demo.yaml

# pytest's exit code 5 (no tests collected) counts as a failure.
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q \
		--durations=15; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
