#!/usr/bin/env bash
# README command 2: install everything the tests need, then lint, type-check and run the
# whole suite. .ci/run calls exactly this.
. "$(dirname "$0")/bootstrap.sh" test
# coturn: interop peer and benchmark anchor; gcc: the benchmark's C load generator;
# iproute2/nftables/iptables: network-namespace NAT tests; chromium: browser interop.
apt_install coturn gcc libc6-dev iproute2 nftables iptables chromium
echo "== ruff"; .venv/bin/ruff check src tests bench fuzz
echo "== ruff format"; .venv/bin/ruff format --check src tests bench fuzz
echo "== mypy --strict"; .venv/bin/mypy
echo "== fuzz (atheris, bounded)"; .venv/bin/python fuzz/fuzz_stun_decode.py -atheris_runs=200000
echo "== pytest"; exec .venv/bin/pytest -p no:cacheprovider "$@"
