"""Imports every technique shipped with suite, so that each registers itself.

Each module must stay importable without torch (its torch code is imported inside the runtime
factory), because `suite validate` and `suite plan` run without it.
"""
from suite.tricks import random_ltd  # noqa: F401
from suite.tricks import multilevel  # noqa: F401
