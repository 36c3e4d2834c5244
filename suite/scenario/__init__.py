"""Scenario language: TOML files -> validated, fully resolved variants."""
from suite.scenario.loader import load_scenario
from suite.scenario.schema import VariantSpec

__all__ = ["load_scenario", "VariantSpec"]
