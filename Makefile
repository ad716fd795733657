# Two entry points on a fresh machine with Python 3.11:
#   make demo   set up .venv, then run the whole job on the embedded default (CPU)
#   make test   set up .venv, then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast clean chromium

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# A second `make demo` replaces the earlier demo run (runs/demo) instead of refusing.
demo: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAY_AUTH_MODE=disabled $(BIN)/bsgal demo --fresh

# pytest's exit code 5 (no tests collected) counts as a failure.
test: install chromium
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q \
		--durations=15; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$status

# The inner loop: everything but the tests that start Ray, moto S3 or Chromium, or take > 20 s.
test-fast: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q \
		-m "not slow and not ray and not s3 and not browser"

# The HTML report's test drives a real headless Chromium (Debian's package); install it if absent.
chromium:
	@if [ -x /usr/bin/chromium ]; then /usr/bin/chromium --version 2>/dev/null; else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium && /usr/bin/chromium --version 2>/dev/null; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
