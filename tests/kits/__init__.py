"""Kits for tests and benchmarks: real processes and helpers that are not
part of the product (importable as `kits` with tests/ on sys.path, as
tests/conftest.py and benchmarks/_common.py arrange)."""
