"""Imports every technique shipped with suite, so that each registers itself."""
