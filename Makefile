# `make demo` and `make test` create .venv and install the project on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# This machine keeps these torch wheels on disk; elsewhere `make TORCH=torch` takes the latest.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean browser

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmcurate demo --out $(DEMO_OUT)

# The report's browser test needs chromium and its driver: installed here when missing and
# possible (root with apt-get); elsewhere that test skips and says why.
browser:
	@if ! command -v chromedriver >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null \
		|| echo "chromium not installed: the browser test will skip"; fi

test: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check mmcurate tests benchmarks
	$(VENV)/bin/ruff format --check mmcurate tests benchmarks

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
