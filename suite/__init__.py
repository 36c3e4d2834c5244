"""suite: measure what an LLM efficiency technique really buys, next to its baselines."""
__version__ = "0.1.0"
RECORD_SCHEMA_VERSION = 2
