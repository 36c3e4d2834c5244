"""The report modules of the plug-ins shipped with suite, imported by ``suite.report.plugins`` on first
use so that each registers its report sections and record upgrades.

Each listed module must import without torch: the reporter runs on machines without it.
"""
MODULES: tuple[str, ...] = ()
