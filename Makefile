# `make run` and `make test` are all a new user types: each sets up what it needs, and is fast when
# it is already set up.
VENV := .venv
PYTHON := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: run test ui serve data

run: $(VENV)/.installed data
	dvc repro

test: $(VENV)/.installed data
	$(PYTHON) -m pytest

ui: $(VENV)/.installed
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

serve: $(VENV)/.installed
	$(PYTHON) -m pipeline.serve

# torch and torchvision first, pinned: pip finds these releases on this machine's disk.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

# The default dataset: Debian's package when we may install it; otherwise torchvision downloads
# Fashion-MNIST into data/raw during `prepare`.
data:
	@if [ ! -d $(FASHION_MNIST) ] && [ ! -d data/raw/FashionMNIST ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	fi
