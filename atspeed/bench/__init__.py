"""Decoding benchmark (``scripts/bench_decode.py``): HF generate, beam search and speculative decoding, timed.

``workload`` loads the models and requests (exported Beauty models, or tiny random ones for the smoke preset),
``decode_bench`` builds the grid of configurations and times them, ``report`` prints the table, writes the JSON and
the speedup plot.
"""
