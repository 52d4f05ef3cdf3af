"""Benchmarks and long robustness runs: scripts that print figures, not tests. Run each from
the checkout's root as ``python3 -m bench.NAME`` (see bench/README.md)."""
