"""The report modules of the plug-ins shipped with suite, imported by ``suite.report.plugins`` on first
use so that each registers its report sections, record fields and schema-1 upgrades (one place to
list them, outside ``suite/report/``, which names no technique).

Each listed module must import without torch: the reporter runs on machines without it.
"""
MODULES: tuple[str, ...] = (
    "suite.tricks.multilevel.report",
    "suite.tricks.random_ltd.report",
    "suite.parallel.cqil_report",
)
