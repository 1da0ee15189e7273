#!/usr/bin/env bash
# README command 1: install tsunagu into ./.venv and run the demo.
. "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/tsunagu demo "$@"
