# ambit: `make demo` and `make test` work on a fresh Debian 12 machine as root.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test lint typecheck unit demo bench proto clean image vagrant-test

setup:
	@bash scripts/setup.sh

lint: setup
	@$(VENV)/bin/ruff check ambit agent ztunnel waypoint gateway controlplane tests bench
	@out=$$($(VENV)/bin/lint-imports --no-cache 2>&1) || { echo "$$out"; exit 1; }; echo "$$out" | tail -n 1

typecheck: setup
	@$(VENV)/bin/mypy

test: setup lint typecheck
	@$(PY) -m pytest -q $(PYTEST_ARGS)

unit: setup
	@$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

demo: setup
	@$(PY) -m agent.demo

# as root: namespaces, eBPF, HAProxy (apt) and ambit on the real path; QUICK=1 for a short smoke run
# The container image, tagged with the package version (ghcr.io/ambit-mesh/ambit:VERSION), built
# here with no registry: a Debian base by mmdebstrap, wheels by pip, podman (scripts/image.sh).
image: setup
	@bash scripts/image.sh

bench: setup
	@command -v haproxy >/dev/null && command -v iptables >/dev/null || { apt-get update -qq >/dev/null; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy iptables >/dev/null; }
	@$(PY) -m bench.run $(if $(QUICK),--quick) $(BENCH_ARGS)

# as root: two VMs (vagrant-libvirt, qemu; plain emulation where KVM cannot boot them) from a box
# built of Debian packages and cached in /var/cache/ambit; mTLS on the wire, policy, flows (vagrant/e2e.sh)
vagrant-test: setup
	@bash vagrant/e2e.sh offline

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info

proto: setup
	@$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. ambit/wire/*.proto
