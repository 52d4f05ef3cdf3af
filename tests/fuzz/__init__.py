"""Fuzz targets (fuzz_targets.py, also run by bench/fuzz.py), their short hypothesis runs,
the regressions fuzzing found, and the native libFuzzer targets (native/)."""
