# `make demo` and `make test` work on a fresh machine: they create .venv, install mimkit and the data.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DATA_DIR ?= .data

.PHONY: demo test test-all evidence evidence-long setup fashion-mnist test-data bench clean

demo: setup fashion-mnist
	$(BIN)/mimkit pretrain --config configs/mae_vit_tiny_fmnist.yaml

# two workers, one thread each: the suite is many small CPU-bound tests (`make test PYTEST_WORKERS=0` runs serially)
PYTEST_WORKERS ?= 2
test: setup fashion-mnist test-data
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra --durations=30 -n $(PYTEST_WORKERS) --dist worksteal

# the demo recipe over pretraining seeds 0 1 2, scored on the test split next to random init and raw pixels:
# benchmarks/results/small_compute/evidence/demo/*.json and docs/results.md (about 20 min a seed; resumable)
evidence: setup fashion-mnist
	PY=$(BIN)/python benchmarks/demo_evidence.sh 0 1 2

# the longer recipe (12 epochs, about 28 min a seed on 2 cores, plus about 9 min of evaluation; resumable)
evidence-long: setup fashion-mnist
	RECIPE=long PY=$(BIN)/python benchmarks/demo_evidence.sh 0 1 2

test-all: setup fashion-mnist test-data
	$(BIN)/python -m pytest -q -ra -m "slow or not slow"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# Fashion-MNIST ships as Debian's dataset-fashion-mnist (IDX files, read offline).
fashion-mnist:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing from $(FMNIST_DIR)."; \
	    echo "Install it with: sudo apt-get install dataset-fashion-mnist"; \
	    echo "or point mimkit at your copy: mimkit pretrain data.path=/path/to/fashion-mnist"; exit 1; \
	  fi; \
	fi

# Small real RGB images for fast tests: CIFAR-10/100 and ImageNet samples inside the foolbox wheel (read, never imported).
test-data: $(DATA_DIR)/foolbox/.done
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium missing: the HTML report rendering test will be skipped (install: apt-get install chromium)"

$(DATA_DIR)/foolbox/.done:
	mkdir -p $(DATA_DIR)/wheels $(DATA_DIR)/foolbox
	$(BIN)/python -m pip download -q --no-deps -d $(DATA_DIR)/wheels foolbox==3.3.4
	cd $(DATA_DIR)/foolbox && $(CURDIR)/$(BIN)/python -m zipfile -e $(CURDIR)/$(DATA_DIR)/wheels/foolbox-3.3.4-py3-none-any.whl .
	touch $@

bench: setup fashion-mnist
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) $(DATA_DIR) runs
