# make setup      create .venv (if missing) and install the package editable
# make test       the whole test suite (unit, slow, notebooks, browser tiers)
# make test-fast  the unit tier only
# make workbench  run the notebooks with the teaching preset into runs/
# make benchmark  the object-tokenizer micro-benchmark
# make clean      remove runs/ and build artefacts (keeps .venv)

PY ?= .venv/bin/python
STAMP := .venv/.stamp

# Nothing is fetched from a hub at run time.
export HF_HUB_OFFLINE := 1

.PHONY: setup test test-fast workbench benchmark clean

setup: $(STAMP)

# torch==2.13.0 (CPU, on local disk) goes in first and only when no torch is
# importable, so a GPU machine's CUDA torch is never replaced, and the package's
# unpinned torch>=2.4 never resolves to a CUDA download. Never torchvision.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The sam2 package (second SAM 2 backend): its video predictor never imports the torchvision it declares,
	# so it goes in without dependencies or CUDA extension; hydra-core and iopath are what it imports.
	$(PY) -m pip install --quiet 'setuptools>=70.1' hydra-core iopath
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation --no-deps 'sam2==1.1.0'
	mkdir -p $(dir $(STAMP))
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not notebooks and not browser"

workbench: setup
	$(PY) -m pixelrefer.cli notebooks run --preset teaching

benchmark: setup
	$(PY) benchmarks/object_tokenizer.py

clean:
	rm -rf runs/ build/ dist/ *.egg-info .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
