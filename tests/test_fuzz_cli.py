"""Property: whatever a scenario file holds, `suite validate` and `suite plan` exit 0 or 2, never a traceback.

Scenarios are generated from the schema itself (every section's dataclass, the techniques' sections, CQIL's
table): a valid tiny scenario with a few keys replaced by values of the right type, the wrong type,
extreme magnitudes, nan and inf, odd strings and unusable paths, unknown keys and sections, ``extends``
and variants, and ``--set`` overrides; some read data files written beside them with random content
(corpora, JSON lines, tokenizer files, megatron .idx/.bin pairs, datasets folders). The CLI's ``main`` runs in-process (fast); any exception other than
the ``UserError`` it turns into exit 2 propagates and fails the test with the generated file.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import struct
import tempfile
import typing
from dataclasses import fields
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from suite.cli import main  # noqa: E402
from suite.data.sources import IDX_MAGIC  # noqa: E402
from suite.parallel.cqil import FINETUNE_KEYS, KEYS as CQIL_KEYS  # noqa: E402
from suite.registry import TRICKS, load  # noqa: E402
from suite.scenario.schema import SECTIONS  # noqa: E402

load()  # registers the techniques and parallel modes

# --- a TOML writer for what the strategies produce (tomllib reads, the standard library writes none) ------


def toml_string(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_document(table: dict) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in table.items())


# --- values -----------------------------------------------------------------------------------------------

INTS = st.sampled_from([0, 1, 2, 3, 4, 8, 16, 64, 128, 256, 1024, -1, -2, 2**31, 2**63 - 1, -(2**63), 10**30])
FLOATS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 3e-4, 1e-300, 1e300, -1.0, 1.5, math.nan, math.inf, -math.inf])
ODD_STRINGS = st.sampled_from(["", " ", "\u0000", "a\u0000b", "x" * 5000, "../..", "/", "/dev/null", "/dev/zero",
                               ".", "builtin:", "builtin:shakespeare", "builtin:shakespeare_wikitext", "builtin:nope",
                               "hf:", "hf:.", "checkpoint:", "checkpoint:/nonexistent", "random", "\ufeff",
                               "caf\u00e9", "\u202e", "tiny", "TINY"])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(INTS, FLOATS, ODD_STRINGS, TEXT, st.booleans())
ANY = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)


def of_type(tp, choices):
    """Values of a field's own type (often in range, often not), else anything."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if choices:
        right = st.sampled_from(list(choices))
    elif origin is list:
        (inner,) = typing.get_args(tp)
        right = st.lists(of_type(inner, None), max_size=6)
    elif tp is bool:
        right = st.booleans()
    elif tp is int:
        right = st.one_of(st.sampled_from([1, 2, 4, 8, 16]), INTS)  # often plausible, often extreme
    elif tp is float:
        right = st.one_of(st.sampled_from([0.1, 1e-3, 0.5]), FLOATS, INTS)
    elif tp is str:
        right = st.one_of(ODD_STRINGS, TEXT)
    elif tp is dict:
        right = cqil_tables()
    else:
        right = ANY
    return st.one_of(right, right, right, ANY)


def cqil_tables():
    small = st.one_of(st.integers(-1, 9), INTS, FLOATS, TEXT)
    groups = st.lists(st.lists(st.one_of(st.integers(-1, 9), INTS), max_size=4), max_size=4)
    finetune = st.dictionaries(st.sampled_from(FINETUNE_KEYS + ("nope",)), st.one_of(INTS, FLOATS, TEXT),
                               max_size=3)
    return st.fixed_dictionaries({}, optional={"start": small, "end": small, "degree": small, "bypass": small,
                                               "groups": st.one_of(groups, ANY), "finetune": st.one_of(finetune, ANY),
                                               "nope": small})


def section_values(cls) -> st.SearchStrategy:
    """A partial [section] table of cls: some of its keys with generated values, sometimes an unknown key."""
    hints = typing.get_type_hints(cls)
    per_key = {f.name: of_type(hints[f.name], f.metadata.get("choices")) for f in fields(cls)}
    known = st.fixed_dictionaries({}, optional=per_key)
    return st.one_of(known, known, known, st.dictionaries(TEXT, ANY, max_size=2), ANY)


SECTION_TABLES = {name: section_values(cls) for name, cls in SECTIONS.items()}
# a parallel mode's table sits inside [parallel] (cqil = {...})
SECTION_TABLES["parallel"] = st.one_of(SECTION_TABLES["parallel"], st.fixed_dictionaries({"cqil": cqil_tables()}))
TRICK_TABLES = {name: section_values(trick.config) for name, trick in TRICKS.items()}
BASES = [
    {"model": {"preset": "tiny"}},
    {"model": {"preset": "tiny", "num_layers": 8}, "workload": {"kind": "inference"},
     "parallel": {"cqil": {"start": 2, "end": 6, "degree": 2}}},
    {"model": {"preset": "tiny", "num_layers": 8}, "workload": {"kind": "accuracy"},
     "data": {"source": "text", "path": "builtin:shakespeare"},
     "parallel": {"cqil": {"start": 2, "end": 6, "degree": 2, "finetune": {"steps": 2}}}},
    {"model": {"preset": "tiny"}, "data": {"source": "text", "path": "builtin:shakespeare"},
     "workload": {"seq_length": 64}, "tricks": {"random_ltd": {"min_kept": 16, "step_size": 16}}},
    {"model": {"preset": "tiny"}, "workload": {"eval_interval": 2},
     "tricks": {"multilevel": {"steps": [4, 4, 4]}}},
]


def idx_header(code: int, sequences: int, documents: int) -> bytes:
    """The start of a megatron .idx: magic, version, dtype code, sequence and document counts."""
    return IDX_MAGIC + struct.pack("<QBQQ", 1, code, sequences, documents)


CORPUS_BYTES = st.one_of(st.binary(max_size=300), TEXT.map(lambda t: t.encode("utf-8")),
                         st.lists(st.one_of(st.dictionaries(st.sampled_from(["text", "body"]), SCALARS, max_size=2),
                                            ANY), max_size=4).map(lambda rows: "\n".join(map(json.dumps, rows)).encode()))
TOKENIZER_BYTES = st.one_of(st.binary(max_size=100), st.sampled_from([b"{}", b'{"version": "1.0"', b"[]", b'"x"']))
IDX_BYTES = st.one_of(st.binary(max_size=64), st.builds(lambda code, n, d, rest: idx_header(code, n, d) + rest,
                                                        st.integers(0, 9), st.sampled_from([0, 1, 2, 2**40]),
                                                        st.sampled_from([0, 1, 3]), st.binary(max_size=48)))


@st.composite
def data_files(draw) -> tuple[dict, dict[str, bytes]]:
    """A [data] section over files written beside the scenario: random corpora, tokenizers, indexed datasets."""
    source = draw(st.sampled_from(["text", "jsonl", "megatron", "hf"]))
    files = {"corpus.txt": draw(CORPUS_BYTES)}
    data = {"source": source, "path": "corpus.txt"}
    if source == "megatron":
        files = {"ds.idx": draw(IDX_BYTES), "ds.bin": draw(st.binary(max_size=64))}
        data["path"] = "ds"
    elif source == "hf":
        files = {"set/dataset_dict.json": draw(st.one_of(TOKENIZER_BYTES, st.just(b'{"splits": ["train"]}'))),
                 "set/train/state.json": draw(TOKENIZER_BYTES)}
        data["path"] = "set"
    tokenizer = draw(st.sampled_from(["byte", "bpe", "hf:tok"]))
    data["tokenizer"] = tokenizer
    if tokenizer == "hf:tok":
        files[draw(st.sampled_from(["tok/tokenizer.json", "tok/tokenizer_config.json"]))] = draw(TOKENIZER_BYTES)
    return data, files


@st.composite
def scenarios(draw) -> tuple[dict, list[str], dict[str, bytes]]:
    table = {k: dict(v) for k, v in draw(st.sampled_from(BASES)).items()}
    files: dict[str, bytes] = {}
    if draw(st.integers(0, 3)) == 1:
        table["data"], files = draw(data_files())
    for name in draw(st.lists(st.sampled_from(list(SECTIONS)), max_size=3)):
        changes = draw(SECTION_TABLES[name])
        base = table.get(name, {})
        table[name] = {**base, **changes} if isinstance(changes, dict) and isinstance(base, dict) else changes
    if draw(st.booleans()):
        name = draw(st.sampled_from(list(TRICKS) + ["nope"]))
        table.setdefault("tricks", {})
        if isinstance(table["tricks"], dict):
            table["tricks"][name] = draw(TRICK_TABLES.get(name, ANY))
    top = {"name": st.one_of(st.sampled_from(["fuzz", "a.b-c+d"]), TEXT, ODD_STRINGS, ANY),
           "extends": st.one_of(ODD_STRINGS, ANY),
           "variants": st.dictionaries(st.one_of(st.sampled_from(["a", "b", "tp2"]), TEXT, ODD_STRINGS),
                                       st.one_of(st.fixed_dictionaries({}, optional={
                                           "parallel": SECTION_TABLES["parallel"],
                                           "workload": SECTION_TABLES["workload"]}), ANY), max_size=3),
           "nope": ANY}
    for key in draw(st.sampled_from([(), (), (), (), ("name",), ("extends",), ("variants",), ("variants",),
                                     ("nope",), ("name", "variants")])):
        table[key] = draw(top[key])
    sets = draw(st.lists(st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(list(SECTIONS) + ["x", ""]),
                                   st.one_of(st.sampled_from(["tp", "steps", "lr", "path", "num_layers"]), TEXT),
                                   st.one_of(st.sampled_from(["2", "nan", "inf", "-1", "[1]", "{a=1}", '"s"', ""]),
                                             TEXT)),
                         max_size=2))
    return table, sets, files


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


CASES = itertools.count()


def write_case(folder: Path, table: dict, files: dict[str, bytes]) -> Path:
    """The scenario and its files in a fresh folder (no file left over from an earlier example)."""
    case = folder / f"case{next(CASES)}"
    for name, content in files.items():
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(content)
    case.mkdir(exist_ok=True)
    path = case / "fuzz.toml"
    path.write_text(toml_document(table), encoding="utf-8")
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(case=scenarios())
def test_validate_and_plan_exit_0_or_2_on_any_scenario(folder, case):
    table, sets, files = case
    path = write_case(folder, table, files)
    args = [a for s in sets for a in ("--set", s)]
    for command in ("validate", "plan"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([command, str(path), *args])
        assert code in (0, 2), (command, code, path.read_text(), sets, files)
        if code == 2:
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()


def test_the_generator_reaches_both_outcomes(folder):
    """The property is not vacuous: the generated scenarios include valid ones and invalid ones."""
    from hypothesis import find

    def outcome(case, want):
        path = write_case(folder, case[0], case[2])
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return main(["plan", str(path), *[a for s in case[1] for a in ("--set", s)]]) == want

    for want in (0, 2):
        find(scenarios(), lambda case: outcome(case, want), settings=settings(max_examples=200, deadline=None))
