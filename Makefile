# `make run` and `make test` are all a new user types: each sets up what it needs, and is fast when
# it is already set up.
VENV := .venv
PYTHON := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

LOCK := requirements.lock

.PHONY: run test test-fast lint lock ui ui-screenshot serve data scaling dataloading search-bench ray-overhead gpu-smoke

run: $(VENV)/.installed data
	dvc repro

test: lint data
	$(PYTHON) -m pytest

test-fast: lint
	$(PYTHON) -m pytest -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The MLflow UI on the pipeline's store (mlflow.tracking_uri), at http://127.0.0.1:5000; the link it
# prints opens the experiment on its runs. ui-screenshot saves that page as headless Chromium draws it.
ui: $(VENV)/.installed
	$(PYTHON) -m pipeline.ui

ui-screenshot: $(VENV)/.installed
	$(PYTHON) -m pipeline.ui --port 5055 --screenshot docs/mlflow_runs.png

# The many-class scaling study, each k with both heads and three losses (79 min on 2 cores, half a million
# training images per loss): metrics/scaling.json, results/scaling.md, plots/scaling.png
scaling: $(VENV)/.installed data
	$(PYTHON) -m pipeline.scaling

# The data-loading benchmark (about 4 min on 2 cores): training's loader per dataset kind at its preset's
# settings with 0..n workers: metrics/dataloading.json, results/dataloading.md, plots/dataloading.png
dataloading: $(VENV)/.installed data
	$(PYTHON) -m pipeline.dataloading

# The search benchmark, on the exports and prepared data of `make run`: a class query at N = 10^4, 10^5, 10^6 stored
# images against its memory-bandwidth limit and the full head, index build rates (in-process and Ray Data), and
# search's precision and recall against evaluate's per loss. N = 10^6 holds about 10 GB of memory and 5 GB of temp
# files: metrics/search.json, results/search.md, plots/search.png, docs/search_example.png
search-bench: $(VENV)/.installed
	$(PYTHON) -m pipeline.search_bench

# Ray's cost: the default grid and a small-data grid (scikit-learn's digits, 40 epochs) through the train
# stage's Ray path and through a plain train_one loop (21 min on 2 cores): metrics/ray_overhead.json,
# results/ray_overhead.md, plots/ray_overhead.png
ray-overhead: $(VENV)/.installed data
	dvc repro prepare
	$(PYTHON) -m pipeline.ray_overhead

# The GPU proof, one command on a CUDA machine (at most 8 minutes, offline): the GPU path trained, evaluated,
# exported, checked against the CPU and timed: metrics/gpu_smoke.json, results/gpu_smoke.md. Without a GPU it stops
# at once; `$(PYTHON) -m pipeline.gpu_smoke --allow-cpu` runs the same steps on tiny data on the CPU instead.
gpu-smoke: $(VENV)/.installed
	$(PYTHON) -m pipeline.gpu_smoke

serve: $(VENV)/.installed
	$(PYTHON) -m pipeline.serve

# Every extra at the versions of $(LOCK), then this project without resolving again; a changed lock
# (or pyproject.toml: entry points, packages) installs again.
$(VENV)/.installed: $(LOCK) pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r $(LOCK)
	$(PYTHON) -m pip install --quiet --no-deps -e .
	touch $@

# Run `make lock` after changing a requirement in pyproject.toml (tests/unit/test_packaging.py fails
# until you do) or to take newer releases: delete $(LOCK) first to upgrade everything, as uv keeps
# the versions already in it where they still fit. It pins every extra for CPython 3.11 on Linux
# x86_64 (glibc 2.36, Debian 12), the machines `make` targets. uv reads no pip.conf, so it gets pip's
# indexes and find-links here: it sees the releases pip sees (torch from this machine's disk).
lock:
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet uv
	UV_INDEX_STRATEGY=unsafe-best-match \
	UV_EXTRA_INDEX_URL="$$($(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)" \
	UV_FIND_LINKS="$$($(PYTHON) -m pip config get global.find-links 2>/dev/null)" \
	$(VENV)/bin/uv pip compile pyproject.toml --extra pipeline --extra serve --extra ray-serve --extra dev \
		--python-version 3.11 --python-platform x86_64-manylinux_2_36 --quiet -o $(LOCK)

# The default dataset: Debian's package when we may install it; otherwise torchvision downloads
# Fashion-MNIST into data/raw during `prepare` (tested by a file: a failed download leaves the folder).
data:
	@if [ ! -d $(FASHION_MNIST) ] && [ ! -f data/raw/FashionMNIST/raw/t10k-labels-idx1-ubyte ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	fi
