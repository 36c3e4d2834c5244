"""The resolved variants, written once by whoever launches and read by every rank.

Data flows one way: the launcher (``python -m suite run``, or ``--slurm``) resolves the scenario once
(``extends``, presets, ``--set``, validation) and writes the variants it starts as JSON in the results
folder; the path reaches the ranks in ``SUITE_RESOLVED``. The ranks rebuild each variant from that
file, so they run exactly what was resolved and planned, even if the TOML changes while a job waits in
a queue. Under bare ``torchrun -m suite run FILE`` nothing is handed over and each rank resolves the
file itself, through the same ``variants_for``.

The file holds ``VariantSpec.resolved()`` (the record's ``config``) with the identity of each
variant; rebuilding goes through the loader's own ``build_variant``, so it is validated again and
hashes to the same ``config_hash``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from suite.errors import UserError

ENV = "SUITE_RESOLVED"
FORMAT = 1


def write(variants, out: str | Path, tag: str) -> Path:
    """Writes ``variants`` to ``OUT/resolved/TAG.json`` (whole, then renamed) and returns its path."""
    path = Path(out) / "resolved" / f"{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "variants": [
        {"scenario": v.scenario, "name": v.name, "file": v.file, "is_baseline": v.is_baseline,
         "config": v.resolved()} for v in variants]}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path.resolve()


def remove(path: Path) -> None:
    """Deletes a handed-over file once its ranks are done (and its folder when that left it empty)."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def _unset(table: dict) -> dict:
    """The table without its null keys: null is how resolved() writes 'unset' (TOML has no null)."""
    return {k: _unset(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}


def read(path: str | Path) -> list:
    """The variants a launcher wrote to ``path``."""
    from suite.scenario.loader import build_variant
    from suite import registry

    registry.load()
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the resolved variants {path}: {e}.", file=str(path),
                        fix=f"unset {ENV} (the launcher sets it) or run the launch again.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path} is not a resolved-variants file of format {FORMAT}.", file=str(path),
                        fix=f"unset {ENV} or launch again with this version of suite.")
    return [build_variant(_unset(v["config"]), scenario=v["scenario"], name=v["name"], file=v["file"],
                          is_baseline=v["is_baseline"]) for v in doc["variants"]]


def variants_for(args) -> list:
    """The variants this process runs: the launcher's resolved file when ``SUITE_RESOLVED`` names one
    (restricted to ``--variant``), else the scenario file resolved here."""
    path = os.environ.get(ENV)
    if not path:
        from suite.scenario import load_scenario

        return load_scenario(args.scenario, args.overrides, args.variants)
    variants = read(path)
    if args.variants:
        missing = [n for n in args.variants if n not in {v.name for v in variants}]
        if missing:
            raise UserError(f"no variant '{missing[0]}' in the resolved variants {path}.", file=str(path),
                            key="--variant", fix=f"variants are: {', '.join(v.name for v in variants)}.")
        variants = [v for v in variants if v.name in args.variants]
    return variants
