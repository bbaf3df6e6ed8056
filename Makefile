# Entry points. Every target installs what it needs (.venv, Java check) on first use.
#   make filter [INPUT=laion/] [OUTPUT=out/filter] [SPARK_MASTER=local[2]] [FILTER_ARGS=...]
#   make distill [INPUT=out/filter] [LABELS=out/labels] [DISTILL_ARGS=...]
#   make train-eval [RUN=runs/default] [TRAIN_ARGS=...]
#   make test | make bench | make sample
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SPARK_SUBMIT := $(VENV)/bin/spark-submit
SAMPLE := data/sample/captions.parquet
INPUT ?=
OUTPUT ?= out/filter
LABELS ?= out/labels
RUN ?= runs/default
SPARK_MASTER ?= local[2]
SPARK_ARGS ?=
FILTER_ARGS ?=
DISTILL_ARGS ?=
TRAIN_ARGS ?=

export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export SPARK_LOCAL_IP := 127.0.0.1
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONPATH := $(CURDIR)

SUBMIT = $(SPARK_SUBMIT) --master '$(SPARK_MASTER)' --conf spark.ui.enabled=false \
	--driver-java-options '-Dlog4j2.configurationFile=$(CURDIR)/conf/log4j2.properties' $(SPARK_ARGS)

.PHONY: setup sample filter distill train-eval ablate test bench clean
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup_env.sh
	@bash scripts/setup_env.sh

sample: $(SAMPLE)
$(SAMPLE): | $(VENV)/.installed
	$(PY) -m pipeline.sample --output $(SAMPLE)

# With no INPUT, filters the embedded sample (generated once by `make sample`).
filter: $(VENV)/.installed $(if $(INPUT),,$(SAMPLE))
	$(SUBMIT) jobs/cat_filter.py --input '$(or $(INPUT),$(SAMPLE))' --output '$(OUTPUT)' $(FILTER_ARGS)

distill: $(VENV)/.installed
	$(SUBMIT) jobs/distill_labels.py --input '$(or $(INPUT),$(OUTPUT))' --output '$(LABELS)' $(DISTILL_ARGS)

# Trains on OUTPUT/shards; on a fresh checkout with the default OUTPUT it filters the sample first.
train-eval: $(VENV)/.installed
	@if [ ! -d '$(OUTPUT)/shards' ]; then \
	  if [ '$(OUTPUT)' = out/filter ]; then $(MAKE) filter; \
	  else echo "no shards in $(OUTPUT)/shards: run make filter OUTPUT=$(OUTPUT) first" >&2; exit 2; fi; fi
	$(PY) -m model_training.train_eval --shards '$(OUTPUT)/shards' --labels '$(LABELS)' --run '$(RUN)' $(TRAIN_ARGS)

ablate: $(VENV)/.installed
	$(PY) -m model_training.ablate --shards '$(OUTPUT)/shards' --labels '$(LABELS)' --out runs/ablate $(ABLATE_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Speed and memory figures; each bench writes bench/results/<name>.json
bench: $(VENV)/.installed
	@set -e; for b in bench/bench_*.py; do echo ">> $$b"; $(PY) $$b; done
	$(PY) -m bench.summary

clean:
	rm -rf out runs data/sample
