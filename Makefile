# The two commands a user needs: `make demo` and `make test` (both call `make setup`);
# `make test-fast` is the edit-test loop (no Ray, no server, nothing slow).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup constraints browser services demo try serve test test-fast test-random ui-check cluster-test bench lint clean

setup: $(STAMP)

# Idempotent: the stamp is keyed by pyproject.toml's and constraints.txt's hash, so a second
# `make setup` is instant. pyproject.toml declares ranges; constraints.txt fixes the exact
# versions the suite runs with. torch==2.13.0 first, named exactly: PyPI's Linux torch is a
# multi-GB CUDA build, and a range would pull it.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

# constraints.txt from what .venv holds now (after installing another version and running the
# suite): its comment lines kept, every distribution but pip and the package, torch without `+cpu`.
constraints:
	{ grep '^#' constraints.txt; $(PY) -m pip freeze --all --exclude-editable --exclude pip | \
	  sed -E 's/^(torch==[^+]+)\+cpu$$/\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

demo: setup
	$(VENV)/bin/slmfactory demo --config configs/demo.yaml

# A served model answering a completion within minutes, from the package's text sample (no
# download); it keeps serving until Ctrl-C. `make demo` is the whole story.
try: setup
	$(VENV)/bin/slmfactory try --config configs/try.yaml

# Serves what `make demo` trained: each domain's best model from the demo sweep's MLflow records.
serve: setup
	$(VENV)/bin/slmfactory serve --config configs/demo.yaml

test: setup browser services
	$(PY) -m pytest -q tests

# The unit tests: everything that starts no Ray cluster, no server and is not slow (the
# markers are in pyproject.toml; tests/conftest.py fails an unmarked test that starts Ray).
test-fast: setup
	$(PY) -m pytest -q -m "not ray and not server and not slow" tests

# The whole suite in a shuffled order (pytest-random-order; SEED=N replays one): no test may
# depend on another having run before it.
SEED ?= 1
test-random: setup browser services
	$(PY) -m pytest -q -p random_order --random-order-seed=$(SEED) tests

# tests/test_ui.py drives the MLflow UI in Debian's headless Chromium (Selenium from the
# test extra); a fresh CI machine gets the browser here (we run as root there).
browser:
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)

# tests/test_cluster_rehearsal.py starts its own PostgreSQL (the MLflow server's store) and Redis
# (the GCS's external store) from Debian's packages, in temp dirs on free loopback ports; a fresh
# CI machine gets the packages here (we run as root there). Nothing is started here.
services:
	test -x /usr/bin/redis-server && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql redis-server)

# The MLflow UI on a finished tiny sweep, in headless Chromium; screenshots into docs/.
ui-check: setup browser
	SLMFACTORY_UI_SCREENSHOTS=docs $(PY) -m pytest -q tests/test_ui.py

# The shared cluster on this machine: a two-node Ray cluster on loopback (GCS on Redis), an MLflow
# server on PostgreSQL; two tiny sweeps submitted at once with `ray job submit`, the tracking
# server killed and restarted mid-sweep, the GCS killed under Serve (`make test` runs it too).
cluster-test: setup services
	$(PY) -m pytest -q tests/test_cluster_rehearsal.py

bench: setup
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs/tmp .pytest_cache
