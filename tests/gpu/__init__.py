"""The GPU tier (pytest -m gpu). A package, so its test files may share basenames with tests/ (test_fp8.py)."""
