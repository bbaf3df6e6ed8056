# Entry points. Every target installs what it needs (.venv, Java check) on first use.
#   make filter [INPUT=laion/] [OUTPUT=out/filter] [SPARK_MASTER=local[2]] [FILTER_ARGS=...]
#   make distill [INPUT=out/filter] [LABELS=out/labels] [DISTILL_ARGS=...]
#   make train-eval [RUN=runs/default] [TRAIN_ARGS=...]
#   make test | make bench | make sample
# Paths (INPUT, OUTPUT, LABELS, RUN) and SPARK_MASTER reach the commands through the environment and
# are used double-quoted ("$$OUTPUT"): any character in them is safe (an apostrophe, `...`, $(...)) and
# nothing in them is ever run by the shell. *_ARGS are options written as on a command line.
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
export INPUT OUTPUT LABELS RUN SPARK_MASTER

export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export SPARK_LOCAL_IP := 127.0.0.1
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONPATH := $(CURDIR)

# the log4j path is relative (make runs in CURDIR): Spark re-splits --driver-java-options on its own quoting rules
SUBMIT = $(SPARK_SUBMIT) --master "$$SPARK_MASTER" --conf spark.ui.enabled=false \
	--driver-java-options -Dlog4j2.configurationFile=conf/log4j2.properties $(SPARK_ARGS)

.PHONY: setup sample filter distill train-eval experiment finetune ablate test bench clean
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup_env.sh
	@bash scripts/setup_env.sh

sample: $(SAMPLE)
$(SAMPLE): | $(VENV)/.installed
	$(PY) -m pipeline.filter.sample --output $(SAMPLE)

# With no INPUT, filters the embedded sample (generated once by `make sample`).
filter: $(VENV)/.installed $(if $(INPUT),,$(SAMPLE))
	$(SUBMIT) jobs/cat_filter.py --input "$${INPUT:-$(SAMPLE)}" --output "$$OUTPUT" $(FILTER_ARGS)

distill: $(VENV)/.installed
	$(SUBMIT) jobs/distill_labels.py --input "$${INPUT:-$$OUTPUT}" --output "$$LABELS" $(DISTILL_ARGS)

# Trains on OUTPUT/shards; on a fresh checkout with the default OUTPUT it filters the sample first.
# train_eval itself says what is missing (no filter run yet, or a filter that kept 0 pairs).
train-eval: $(VENV)/.installed
	@if [ "$$OUTPUT" = out/filter ] && [ ! -e out/filter/stats.json ]; then $(MAKE) filter; fi
	$(PY) -m model_training.train_eval --shards "$$OUTPUT/shards" --labels "$$LABELS" --run "$$RUN" $(TRAIN_ARGS)

# The Flickr8k evidence experiment (experiments/flickr8k.py): ~30 min on 2 cores; EXPERIMENT_ARGS="--scale gpu" on a GPU
EXPERIMENT_OUT ?= out/experiment
FLICKR8K ?= ../shared/data/flickr8k
EXPERIMENT_ARGS ?=
export EXPERIMENT_OUT FLICKR8K
experiment: $(VENV)/.installed
	$(PY) -m experiments.flickr8k --out "$$EXPERIMENT_OUT" --flickr8k "$$FLICKR8K" $(EXPERIMENT_ARGS)

# Fine-tuning protocol: start from CHECKPOINT (an open_clip state dict), train on Flickr8k train, evaluate on dev
CHECKPOINT ?=
FINETUNE_ARGS ?=
export CHECKPOINT
finetune: $(VENV)/.installed
	$(PY) -m experiments.finetune --flickr8k "$$FLICKR8K" --checkpoint "$$CHECKPOINT" --run "$$RUN" $(FINETUNE_ARGS)

ablate: $(VENV)/.installed
	$(PY) -m model_training.ablate --shards "$$OUTPUT/shards" --labels "$$LABELS" --out runs/ablate $(ABLATE_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Speed and memory figures; each bench writes bench/results/<name>.json
bench: $(VENV)/.installed
	@set -e; for b in bench/bench_*.py; do echo ">> $$b"; $(PY) $$b; done
	$(PY) bench/cost_model.py    # after the benchmarks: it reads their results
	$(PY) -m bench.summary

clean:
	rm -rf out runs data/sample

# Re-decide OUTPUT with new thresholds from its stored evidence (no parsing, download or OCR), into INTO:
#   make redecide OUTPUT=out/filter INTO=out/filter-c2 DECIDE_ARGS="--min-complexity 2 --min-conf 0.7 --min-chars 4"
#   make redecide OUTPUT=out/filter INTO=out/sweep DECIDE_ARGS="--sweep"      # table + chart over a threshold grid
INTO ?= out/redecided
DECIDE_ARGS ?=
export INTO
.PHONY: redecide
# plain python: the local engine (outputs up to 100k rows) needs no JVM; the Spark engine starts a
# session itself on SPARK_MASTER (for a cluster's confs use spark-submit jobs/redecide.py directly)
redecide: $(VENV)/.installed
	$(PY) jobs/redecide.py --source "$$OUTPUT" --into "$$INTO" $(DECIDE_ARGS)
