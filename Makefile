# Two commands do all set-up on a fresh machine:
#   make quickstart   creates .venv, installs loraflow, builds the tiny model, runs the pipeline
#   make test         runs the test suite
# Both are idempotent: the install runs again only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
# The CPU build on machines without a GPU: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
TINY_MODEL := .loraflow/models/tiny-llama
QUICKSTART_DATA := examples/quickstart/finance_sentiment.jsonl
TINY_MODEL_ZH := .loraflow/models/tiny-llama-zh
QUICKSTART_ZH_DATA := examples/quickstart-zh/finance_sentiment_zh.jsonl examples/quickstart-zh/finance_analysis_zh.jsonl

.PHONY: install quickstart quickstart-zh test lint tools

install: $(VENV)/.installed

# constraints.txt pins every other package to the versions the tests passed with (reproducible runs).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# The export formats' tools (`export.quantize`), each in an environment of its own because each pins
# versions loraflow does not use (tools/*.txt say which). An environment is layered over $(VENV)
# (a .pth file: torch and the rest are shared) and holds only what differs: seconds, not a 2 GB venv.
TOOLS := .loraflow/tools
tools: $(TOOLS)/llmcompressor/.installed $(TOOLS)/gguf/.installed

$(TOOLS)/%/.installed: tools/%.txt $(VENV)/.installed
	rm -rf $(TOOLS)/$*
	$(BIN)/python -m venv $(TOOLS)/$*
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(TOOLS)/$*/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-loraflow-venv.pth"
	$(TOOLS)/$*/bin/python -m pip install --quiet --no-deps -r tools/$*.txt
	touch $@

quickstart: install
	$(BIN)/loraflow tiny-model $(TINY_MODEL) --corpus $(QUICKSTART_DATA)
	$(BIN)/loraflow run configs/quickstart.yaml

# The Chinese quickstart: sentiment (accuracy), then the long-answer analysis task (ROUGE-L).
quickstart-zh: install
	$(BIN)/loraflow tiny-model $(TINY_MODEL_ZH) $(addprefix --corpus ,$(QUICKSTART_ZH_DATA))
	$(BIN)/loraflow run configs/quickstart-zh.yaml
	$(BIN)/loraflow run configs/quickstart-zh-analysis.yaml

test: install tools
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check tasks flows tests benchmarks examples
