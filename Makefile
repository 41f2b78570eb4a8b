.PHONY: setup quickstart test lint format bench

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/python -m atspeed fit --config configs/quickstart/target_sft.yaml

test: setup
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

bench: setup
	.venv/bin/python scripts/bench_decode.py
