# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench clean deb deb-test image-test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/edge-agent demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(BIN)/.installed
	$(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_buffer.py

# The Debian package from the wheel (dist/edge-agent_<version>_<arch>.deb), and its test in a
# fresh bookworm root made with debootstrap (root needed; tests/deploy/test_deb.py).
deb: $(BIN)/.installed
	BUILD_PYTHON=$(BIN)/python bash packaging/deb/build.sh dist

deb-test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m deploy -s -o timeout=1800 tests/deploy/test_deb.py

# The container image built and run by a Docker engine (started here when none answers; skips
# with the reason when none can be): size, uid, health, demo, SIGTERM, upgrade on a volume.
image-test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m deploy -s -o timeout=1800 tests/deploy/test_image.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
