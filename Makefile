# Everything runs inside .venv, which the targets create on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench bench-device device-wheels clean

# constraints.txt pins the versions CI ran (pyproject.toml keeps lower bounds)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m jaxdiff.cli demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=10 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not slow" --durations=10 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# the accelerator run (benchmarks/device.py's docstring): here it runs on whatever jax finds
bench-device: $(STAMP)
	$(BIN)/python benchmarks/device.py --out outputs/device --results benchmarks/RESULTS.md

# what the device lacks (diffusers and its pure-Python needs, Pillow), as Python 3.12 wheels
DEVICE_WHEELS := diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0 requests==2.32.5 \
	urllib3==2.5.0 idna==3.10 certifi==2025.8.3 charset_normalizer==3.4.3 pillow==11.3.0
device-wheels: $(STAMP)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-d benchmarks/.wheels $(DEVICE_WHEELS)
	du -sh benchmarks/.wheels

clean:
	rm -rf $(VENV)
