# The two Quickstart commands: `make train` (the main job) and `make test`.
# Both create the virtual environment on first use (~2 minutes, ~3 GB).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= runs/local_tiny
EXPORT_DIR ?= $(MODEL_DIR)/export
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# A short UL2 pre-training run on the bundled corpus, then export to Hugging Face format.
train: setup
	$(BIN)/ul2 train --gin_file=gin/runs/local_tiny.gin --model_dir=$(MODEL_DIR)
	$(BIN)/ul2 export --model_dir=$(MODEL_DIR) --output_dir=$(EXPORT_DIR) --overwrite

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
