# hllm-pipeline: every target installs first when .venv is missing.
# TORCH_VERSION=2.13.0 is the CPU build on the project's machines; on a GPU machine the same pin pulls the CUDA
# build from PyPI. Override it (make install TORCH_VERSION=2.5.1) to match your CUDA driver.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# FAISS build for eval's search: cpu (faiss-cpu) or gpu (faiss-gpu-cu12); they are alternatives
FAISS ?= cpu
# the pinned, hashed dependencies (Linux x86_64, Python 3.11); LOCK= installs from pyproject.toml's ranges instead
LOCK ?= requirements.lock
VENV := .venv
BIN := $(VENV)/bin
CLI := $(BIN)/hllm-pipeline
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# the stamp is written last and names what it was built with: another torch or Python rebuilds the venv
STAMP := $(VENV)/.installed-torch$(TORCH_VERSION)-faiss$(FAISS)-py$(PYTHON_VERSION)
DATASET ?= ml-100k
RUN ?= artifacts/$(DATASET)
CONFIG ?=
EVAL_ARGS ?=
CATALOG ?= artifacts/raw/$(DATASET)
REFRESH_ARGS ?=
# model presets are fetched here (the CLI's default elsewhere: ~/.cache/hllm-pipeline/models)
export HLLM_MODELS_DIR ?= $(CURDIR)/artifacts/models

.PHONY: install lock test test-fast demo own data embed-items train-user eval refresh bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)  # from scratch: a half-built venv (an interrupted install) is never reused
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(if $(LOCK),$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK))
	$(BIN)/python -m pip install --quiet -e ".[dev,$(FAISS)]"
	touch $(STAMP)

# Re-pin requirements.lock from pyproject.toml (needs a CPU torch wheel that pip can find, as on our machines)
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv
	echo "torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')" > $(VENV)/torch-override.txt
	tail -n +4 $(LOCK) > $(VENV)/requirements.lock.new  # uv keeps these pins where they still fit: a minimal change
	$(BIN)/python -m uv pip compile pyproject.toml --extra dev --python-version 3.11 $${PIP_FIND_LINKS:+--find-links $$PIP_FIND_LINKS} \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --no-emit-package torch \
		--override $(VENV)/torch-override.txt --no-header --no-annotate -o $(VENV)/requirements.lock.new
	{ head -3 requirements.lock; cat $(VENV)/requirements.lock.new; } > requirements.lock.tmp && mv requirements.lock.tmp requirements.lock

# One pytest worker per core, a test file per worker at a time (module fixtures are built once)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# The edit-test loop: everything but the tests that train models or need the network
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow and not smoke"

lint: $(STAMP)
	$(BIN)/ruff check .

# Fetch and prepare a MovieLens dataset: make data DATASET=ml-1m (settings: stages/configs/data-$(DATASET).yaml)
data: $(STAMP)
	$(CLI) data fetch $(DATASET) --dest artifacts/raw/$(DATASET)
	$(CLI) data prepare --config stages/configs/data-$(DATASET).yaml

# The whole pipeline on ML-100K: prepare -> stage one -> stage two -> eval (about 4 minutes on 2 cores).
demo: $(STAMP)
	$(MAKE) --no-print-directory data DATASET=ml-100k
	$(MAKE) --no-print-directory embed-items DATASET=ml-100k
	$(MAKE) --no-print-directory train-user DATASET=ml-100k
	$(MAKE) --no-print-directory eval DATASET=ml-100k

# Your own data, the whole pipeline with the small-data CPU recipe (the demo's):
#   make own INTERACTIONS=mydata/interactions.csv ITEMS=mydata/items.csv NAME=mydata
NAME ?= mydata
own: $(STAMP)
	@test -n "$(INTERACTIONS)" -a -n "$(ITEMS)" || { echo "error: give INTERACTIONS=FILE.csv ITEMS=FILE.csv (and NAME=...)" >&2; exit 2; }
	$(CLI) data prepare --format hllm-csv --source $(INTERACTIONS) items=$(ITEMS) --out artifacts/$(NAME)/data
	$(CLI) embed-items --config stages/configs/embed-ml-100k-cpu.yaml data=artifacts/$(NAME)/data out=artifacts/$(NAME)
	$(CLI) train-user --config stages/configs/user-ml-100k-cpu.yaml data=artifacts/$(NAME)/data run=artifacts/$(NAME)
	$(CLI) eval --run artifacts/$(NAME) --k 10 50 200

# The canonical tables of $(DATASET), prepared once.
DATA_READY := artifacts/$(DATASET)/data/stats.json
$(DATA_READY): | $(STAMP)
	$(MAKE) --no-print-directory data DATASET=$(DATASET)

# Stage one: fine-tune the Item LLM, then embed the catalogue (prepares the data first if needed).
#   make embed-items                                    (ML-100K on CPU)
#   make embed-items DATASET=ml-1m CONFIG=stages/configs/embed-ml-1m-smollm2-gpu.yaml
embed-items: $(STAMP) $(DATA_READY)
	$(CLI) embed-items --config $(or $(CONFIG),stages/configs/embed-$(DATASET)-cpu.yaml)

# Stage two: the User LLM on stage one's cached embeddings. make train-user CONFIG=stages/configs/<x>.yaml
train-user: $(STAMP)
	$(CLI) train-user --config $(or $(CONFIG),stages/configs/user-$(DATASET)-cpu.yaml)

# Evaluation on the test targets (full ranking, history masked): make eval DATASET=ml-1m
#   make eval EVAL_ARGS="--model popularity"      make eval EVAL_ARGS="--split valid --index hnsw --per-user-ranks"
eval: $(STAMP)
	$(CLI) eval --run $(RUN) --k 10 50 200 $(EVAL_ARGS)

# Refresh the item embeddings of $(RUN) from the catalogue as it is now (only new and changed items are embedded):
#   make refresh CATALOG=path/to/items.csv      (default: the raw dataset folder the run was prepared from)
refresh: $(STAMP)
	$(CLI) refresh items --catalog $(CATALOG) --run $(RUN) $(REFRESH_ARGS)

# Benchmarks write JSON under bench/results/ (the embedding benchmark needs ML-1M: make data DATASET=ml-1m);
# `hllm-pipeline bench train` and the GPU ones (embed-mfu) run on their own.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(MAKE) --no-print-directory data DATASET=ml-1m
	$(CLI) bench embed --data artifacts/ml-1m/data --out bench/results/embed-cpu.json
	$(CLI) bench search --out bench/results/search-cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
