"""`suite validate --explain SECTION`: every key of a section, from the schema's own doc() metadata."""
from __future__ import annotations

import dataclasses

import pytest

from suite import registry
from suite.cli import explain, main
from suite.scenario.schema import SECTIONS


def all_sections() -> dict:
    registry.load()
    return {**SECTIONS, **{f"tricks.{n}": t.config for n, t in registry.TRICKS.items()},
            **{f"parallel.{n}": m.config for n, m in registry.PARALLEL_MODES.items()}}


@pytest.mark.parametrize("section", sorted(all_sections()))
def test_every_key_is_explained_with_its_doc(section):
    text = explain(section)
    for f in dataclasses.fields(all_sections()[section]):
        assert f.metadata.get("doc"), f"{section}.{f.name} has no doc()"
        assert f"\n{f.name} (" in text and f.metadata["doc"] in text
        if f.metadata.get("range"):
            assert f"range {f.metadata['range']}" in text.split(f"\n{f.name} (")[1].splitlines()[0]


def test_explain_shows_defaults_and_choices(capsys):
    assert main(["validate", "--explain", "workload"]) == 0
    out = capsys.readouterr().out
    assert "kind (str; default 'train'; one of train, inference, accuracy)" in out
    assert "steps (int; default 20; range [1, 1000000000])" in out


def test_unknown_section_is_one_line_and_exit_2(capsys):
    assert main(["validate", "--explain", "workloads"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'workload'" in err and err.count("\n") == 1
    assert main(["validate"]) == 2 and "no scenario file given" in capsys.readouterr().err
