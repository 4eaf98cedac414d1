# The two set-up commands: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck layers unit integration clean protos bench lock

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing fashionserve with every extra (PyTorch CPU build included)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/fashionserve serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy fashionserve tests

# The import-linter contracts of pyproject.toml: the layers, the client's isolation, no cycles.
layers: $(STAMP)
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

test: lint typecheck layers
	$(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache

# The images' locks: every package of each image pinned with its hashes, resolved from the
# pins of pyproject.toml for the images' platform (Linux x86-64, glibc 2.35, Python 3.11);
# docker/*.Dockerfile install them with --require-hashes. setuptools, the build backend, is
# locked too: the images build the package without build isolation, so nothing unhashed is
# downloaded. Run after changing a dependency; tests/unit/test_dependencies.py checks the pins.
BUILD_BACKEND := setuptools==80.9.0
LOCK := $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_35 --custom-compile-command "make lock"
lock: $(STAMP)
	echo "$(BUILD_BACKEND)" | $(LOCK) pyproject.toml - -o docker/gateway.lock
	echo "$(BUILD_BACKEND)" | $(LOCK) pyproject.toml --extra triton - -o docker/triton.lock

# Regenerates the Python code of the gRPC contract; tests check it is up to date.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. fashionserve/protos/fashion/v1/analysis_service.proto

# The standard benchmark on the embedded default stack: writes BENCHMARKS.md (section
# cpu-default) and benchmarks/cpu-default/. SOAK=120 shortens the memory soak. Run it on a
# quiet machine, not while `make serve` runs (both use var/). It installs the `peers` extra
# (Ray Serve, which `make test` leaves out); the bench refuses to measure the Ray Serve
# reference unless it answers its images like fashionserve (tests/integration/
# test_ray_serve.py checks the same with Ray installed).
SOAK ?= 600
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,peers]'
	$(BIN)/fashionserve loadtest bench --soak-duration $(SOAK)
