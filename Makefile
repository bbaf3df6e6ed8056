# Entry points. Every target installs what it needs (.venv, Java check) on first use; each one runs the
# `catcurate` console command (catcurate/cli.py), which is also the Python-free-of-make way to run them.
#   make filter [INPUT=laion/] [OUTPUT=out/filter] [SPARK_MASTER=local[2]] [FILTER_ARGS=...]
#   make distill [INPUT=out/filter] [LABELS=out/labels] [DISTILL_ARGS=...]
#   make train-eval [RUN=runs/default] [TRAIN_ARGS=...]
#   make redecide [OUTPUT=out/filter] [INTO=out/redecided] [DECIDE_ARGS=...]
#   make test | make bench | make sample | make experiment [EXPERIMENT_OUT=out/experiment] | make experiment-reading
# Nothing a user puts in these variables is ever run, by make or by a shell: make would expand `$(shell ...)`
# in a variable wherever it is referenced (even under make -n), so each one is read once, unexpanded
# ($(value ...)), into a CC_* copy that reaches the recipe only through the environment and is used
# double-quoted there; the originals are unexported. *_ARGS are options written as on a command line:
# catcurate splits them with shlex (quotes work), never a shell. tests/test_cli.py checks this.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CATCURATE := $(VENV)/bin/catcurate

USER_VARS := INPUT OUTPUT LABELS RUN INTO SPARK_MASTER SPARK_ARGS FILTER_ARGS DISTILL_ARGS TRAIN_ARGS \
             DECIDE_ARGS EXPERIMENT_OUT FLICKR8K EXPERIMENT_ARGS CHECKPOINT FINETUNE_ARGS ABLATE_ARGS PYTEST_ARGS
DEFAULT_OUTPUT := out/filter
DEFAULT_LABELS := out/labels
DEFAULT_RUN := runs/default
DEFAULT_INTO := out/redecided
DEFAULT_SPARK_MASTER := local[2]
DEFAULT_EXPERIMENT_OUT := out/experiment
DEFAULT_FLICKR8K := ../shared/data/flickr8k
$(foreach v,$(USER_VARS),$(eval override CC_$(v) := $$(if $$(value $(v)),$$(value $(v)),$$(DEFAULT_$(v)))))
export $(addprefix CC_,$(USER_VARS))
unexport $(USER_VARS)

export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export SPARK_LOCAL_IP := 127.0.0.1
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONPATH := $(CURDIR)
# the user's *_ARGS reach catcurate through this variable (catcurate/cli.py: EXTRA_ARGS_ENV)
ARGS = CATCURATE_EXTRA_ARGS="$$CC_$(1)"

.PHONY: setup sample filter distill train-eval experiment experiment-reading experiment-arms finetune ablate test bench clean redecide
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml scripts/setup_env.sh
	@bash scripts/setup_env.sh

sample: $(VENV)/.installed
	$(CATCURATE) sample

# With no INPUT, filters the embedded sample (catcurate generates it once, as `make sample`).
filter: $(VENV)/.installed
	$(call ARGS,FILTER_ARGS) $(CATCURATE) filter $${CC_INPUT:+--input "$$CC_INPUT"} --output "$$CC_OUTPUT" \
		--master "$$CC_SPARK_MASTER" --spark-args "$$CC_SPARK_ARGS"

distill: $(VENV)/.installed
	$(call ARGS,DISTILL_ARGS) $(CATCURATE) distill --input "$${CC_INPUT:-$$CC_OUTPUT}" --output "$$CC_LABELS" \
		--master "$$CC_SPARK_MASTER" --spark-args "$$CC_SPARK_ARGS"

# Trains on OUTPUT/shards; on a fresh checkout with the default OUTPUT it filters the sample first.
# train_eval itself says what is missing (no filter run yet, or a filter that kept 0 pairs).
train-eval: $(VENV)/.installed
	@if [ "$$CC_OUTPUT" = out/filter ] && [ ! -e out/filter/stats.json ]; then $(MAKE) --no-print-directory filter; fi
	$(call ARGS,TRAIN_ARGS) $(CATCURATE) train-eval --shards "$$CC_OUTPUT/shards" --labels "$$CC_LABELS" --run "$$CC_RUN"

# The Flickr8k evidence (experiments/budget.py): does filtering pay, at which training budget? The whole pool
# (30,000 noisy pairs), arms x budgets x 3 seeds, the locked image tower; results in OUT/results/budget.*
experiment: $(VENV)/.installed
	$(call ARGS,EXPERIMENT_ARGS) $(CATCURATE) experiment-budget --out "$$CC_EXPERIMENT_OUT" --flickr8k "$$CC_FLICKR8K"

# The same pool with a tower that reads (the words the text spotter reads, beside the locked features;
# EXPERIMENT_ARGS="--tower glyphs": a CNN over 96-px thumbnails that may learn to): OUT/results-ocr/
experiment-reading: $(VENV)/.installed
	$(call ARGS,EXPERIMENT_ARGS) $(CATCURATE) experiment-budget --scale reading --out "$$CC_EXPERIMENT_OUT" --flickr8k "$$CC_FLICKR8K"

# Every arm at one budget on 1,500 photos, and the filter scored as a detector of each noise type
# (experiments/flickr8k.py): OUT/arms/results/
experiment-arms: $(VENV)/.installed
	$(call ARGS,EXPERIMENT_ARGS) $(CATCURATE) experiment --out "$$CC_EXPERIMENT_OUT/arms" --flickr8k "$$CC_FLICKR8K"

# Fine-tuning protocol: start from CHECKPOINT (an open_clip state dict), train on Flickr8k train, evaluate on dev
finetune: $(VENV)/.installed
	$(call ARGS,FINETUNE_ARGS) $(CATCURATE) finetune --flickr8k "$$CC_FLICKR8K" --checkpoint "$$CC_CHECKPOINT" --run "$$CC_RUN"

ablate: $(VENV)/.installed
	$(call ARGS,ABLATE_ARGS) $(CATCURATE) ablate --shards "$$CC_OUTPUT/shards" --labels "$$CC_LABELS" --out runs/ablate

test: $(VENV)/.installed
	set -f; $(PY) -m pytest -q tests $$CC_PYTEST_ARGS

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
# plain python: the local engine (outputs up to 100k rows) needs no JVM; the Spark engine starts a
# session itself on SPARK_MASTER (for a cluster's confs use `catcurate redecide --engine spark` under spark-submit)
redecide: $(VENV)/.installed
	$(call ARGS,DECIDE_ARGS) SPARK_MASTER="$$CC_SPARK_MASTER" $(CATCURATE) redecide --source "$$CC_OUTPUT" --into "$$CC_INTO"
