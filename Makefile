# make demo : set up (first run only) and run the main job on the bundled demo data
# make test : set up (first run only) and run the test suite
VENV   ?= .venv
PYTHON ?= python3
UV      = $(PYTHON) -m uv
EXTRAS  = --extra dev --extra bench
STAMP   = $(VENV)/.synced

.PHONY: demo test setup clean

$(STAMP): pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen $(EXTRAS) --python $(PYTHON)
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snakemake --cores all

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache
