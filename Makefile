# aproxy's build entry points. `make run` and `make test` are the README's two commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the kernel test tier and the IPVS backend need (installed only when root and missing).
APT_PACKAGES := user-mode-linux kmod ipvsadm iproute2 iptables conntrack ipset procps python3-venv

.PHONY: install run plan test lint types contracts pytest kernel-test bench lock clean image

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
		if [ -n "$$missing" ]; then \
			echo "installing Debian packages: $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# The main job: aproxy programming a real IPVS kernel (a user-mode Linux guest), narrated (demo/run.py).
run: install
	$(BIN)/python demo/run.py

# What aproxy would program for the bundled example on node-a, without touching any kernel.
plan: install
	$(BIN)/aproxy plan --source examples/cluster.yaml --node-name node-a --node-ip 192.0.2.10 --output text

lint: install
	$(BIN)/ruff check aproxy tests bench demo
	$(BIN)/ruff format --check aproxy tests bench demo

types: install
	$(BIN)/mypy

contracts: install
	$(BIN)/lint-imports

pytest: install
	$(BIN)/pytest

test: lint types contracts pytest

kernel-test: install
	$(BIN)/python tests/kernel/run.py

bench: install
	$(BIN)/python bench/core.py

# The node image (Dockerfile) with podman or docker, whichever is installed. BASE=IMAGE overrides the base
# (for example one built from Debian's packages where no registry can be reached: see tests/image).
IMAGE ?= aproxy:latest
BUILDER ?= $(shell command -v podman || command -v docker)

image:
	@test -n "$(BUILDER)" || { echo "make image: install podman or docker"; exit 1; }
	$(BUILDER) build $(if $(BASE),--build-arg BASE=$(BASE)) -t $(IMAGE) .

# Regenerate the lock file after changing pyproject.toml's pins. It carries pins and hashes only, resolved on
# the public index: no pip configuration of the machine that runs this (config files, PIP_* index, find-links
# and constraint variables) may add a package source to the resolution or write one into the file.
LOCK_ENV := env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_NO_INDEX -u PIP_CONSTRAINT \
    PIP_CONFIG_FILE=/dev/null

lock:
	$(LOCK_ENV) $(BIN)/pip install -q pip-tools==7.6.2
	$(LOCK_ENV) $(BIN)/pip-compile -q --extra dev --generate-hashes --strip-extras --no-emit-index-url \
		--no-emit-find-links -o requirements.lock pyproject.toml
	# The image's lock: the runtime dependencies only, at the versions (and hashes) of requirements.lock.
	$(LOCK_ENV) $(BIN)/pip-compile -q --generate-hashes --strip-extras --no-emit-index-url \
		--no-emit-find-links -c requirements.lock -o requirements-runtime.lock pyproject.toml

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache
