# segtrain: the two commands are `make demo` and `make test`; both run `make setup` first.
SHELL := /bin/bash
CARGO ?= cargo
# A one-off build gains nothing from incremental state, and it is gigabytes of disk (see Cargo.toml).
export CARGO_INCREMENTAL ?= 0

.PHONY: setup build test fuzz fmt-check clippy lint-deploy demo clean-demo bench-coordinator

## setup: system packages, the torch venv (outside the checkout), build. Idempotent.
setup:
	@bash deploy/setup.sh

build: setup

## test: formatting, lints, then every test against real PostgreSQL clusters and real processes.
test: setup fmt-check clippy lint-deploy
	$(CARGO) build --workspace --bins --quiet
	$(CARGO) test --workspace --no-fail-fast

## bench-coordinator: the coordinator under 1,024 and 10,000 simulated GPUs (segtrain-loadgen);
## appends the tables to bench/results.md. A benchmark: it asserts nothing.
bench-coordinator: setup
	$(CARGO) build --release --quiet -p segtrain-coordinator -p segtrain-loadgen -p segtrain-tests --bins
	bash bench/coordinator.sh

## fuzz: the job-spec and job-file property tests (spec/tests/fuzz.rs), far longer than in `test`.
fuzz:
	PROPTEST_CASES=$${PROPTEST_CASES:-100000} $(CARGO) test -p segtrain-spec --test fuzz --release

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings

## lint-deploy: shellcheck on deploy/ and .ci/run; systemd-analyze verify on the units, installed
## into a temporary DESTDIR by deploy/install.sh (deploy/lint.sh).
lint-deploy:
	$(CARGO) build --workspace --bins --quiet
	@bash deploy/lint.sh

## demo: a throwaway PostgreSQL and the coordinator, a job submitted and queried through the CLI.
demo: setup
	@bash deploy/demo.sh
