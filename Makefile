# Thin wrappers over pip, pytest and the fvrt CLIs. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Written by the last step of `make setup`: every target that needs the environment depends on it, so a fresh
# checkout needs no separate setup step, and a changed pyproject.toml or Makefile installs again.
STAMP  := $(VENV)/.setup-stamp
# CPU machines and CI: torch 2.13 (CPU build). The GPU machines ship torch 2.11 and install nothing.
TORCH  ?= torch==2.13.0
# The official implementation, our numerical oracle (test-only). It pins torch~=2.7 and torchaudio, so it is
# installed without dependencies; the modules it imports come with the [test] extra.
ORACLE := ltx-core==1.0.0 ltx-pipelines==1.0.0
# NVIDIA ModelOpt, core only: its extras pin onnx / transformers versions that conflict with ours. These are the
# modules `import modelopt.torch.quantization` needs (measured; see docs/quantization.md).
MODELOPT := nvidia-modelopt==0.47.0
MODELOPT_DEPS := requests omegaconf pulp

.PHONY: setup browser test test-gpu lint run serve clean engines bench bench-tiny

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,trt,serve]"
	$(BIN)/pip install -q --no-deps $(ORACLE)
	$(BIN)/pip install -q --no-deps $(MODELOPT)
	$(BIN)/pip install -q $(MODELOPT_DEPS)
	touch $@

# The web page test's browser: Chromium and its WebDriver from the Debian packages (root; CI runs it)
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# The embedded default: a tiny random LTX-2.3 (tiny Gemma included, nothing downloaded) compiled with torch-aot
# on the CPU, fp32, profile "tiny". Rebuilds nothing when $(ENGINES) is up to date (same build key).
ENGINES ?= engines/tiny
engines: $(STAMP)
	$(BIN)/fvrt-build $(ENGINES) --random tiny --backend torch-aot --precision fp32 --device cpu --profile tiny

test: $(STAMP)
	$(BIN)/pytest -q --durations=15  # the slowest tests, for the CI budget (90 min)

test-gpu: $(STAMP)
	$(BIN)/pytest -q -m gpu

LINTED := builder runtime plugins src tests scripts lab
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# The main job on the embedded default: text -> 17 frames of 128x192 video with audio, from the tiny random
# engines (noise-like output: random weights). Real output needs the LTX-2.3 weights (README).
PROMPT ?= A red fox trots across a snowy field at dawn, its breath steaming, birds calling.
run: engines
	mkdir -p out
	$(BIN)/fvrt-run $(ENGINES) --prompt "$(PROMPT)" --output out/tiny.mp4 --timings out/tiny-timings.json

# Serve the engines over HTTP (Ray Serve, one local cluster): the /v1/videos API and a web page at the printed URL.
# CPU replicas for the tiny default; on GPUs, one replica per GPU (REPLICAS=8). Ctrl-C drains and stops.
REPLICAS ?= 1
PORT ?= 8000
serve: engines
	$(BIN)/fvrt-serve $(ENGINES) --replicas $(REPLICAS) --port $(PORT) --results out/results

# Benchmark, one process: fvrt engines bf16 and FP8, presets distilled and realtime, 1088x1920x121 from full-size
# random weights (engines built once into engines/bench, then reused), per-stage times, peak memory, FP8-vs-bf16
# quality. GPU machine (python3 there, nothing installed): see docs/benchmarks.md for the exact command.
BENCH_PY ?= $(BIN)/python
bench:
	$(BENCH_PY) scripts/bench.py --random full --device cuda --profile 1080p --out out/bench

# The same harness at tiny size on the CPU (a smoke run of every code path; the numbers mean nothing).
bench-tiny: $(STAMP)
	$(BIN)/python scripts/bench.py --random tiny --device cpu --profile tiny --repeats 1 --calib-count 2 \
		--engines engines/bench-tiny --out out/bench-tiny

clean:
	rm -rf out .pytest_cache
