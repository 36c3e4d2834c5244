"""TOML file -> resolved variants.

Order of precedence (later wins): ``extends`` chain (deepest first) < the file's own sections <
``[variants.<name>]`` overrides < ``--set section.key=value`` from the command line. A preset named in
``[model] preset`` fills the model keys that are still unset after all of that.

Scenario file layout::

    name = "tiny"                # optional, default: the file's stem
    extends = "base.toml"        # optional, relative to this file
    [model] ... [parallel] ... [workload] ... [data] ... [eval] ... [report] ...
    [tricks.random_ltd] ...      # technique sections, see suite.tricks
    [variants.baseline]          # optional; each variant overrides keys of the sections above
    [variants.tp2.parallel]
    tp = 2
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from suite import registry
from suite.data.sources import file_problem
from suite.errors import UserError, did_you_mean
from suite.registry import PARALLEL_MODES, TRICKS
from suite.scenario.presets import PRESETS, default_ffn
from suite.scenario.schema import SECTIONS, VariantSpec, describe_range, out_of_range
from suite.scenario.validate import check_variant

TOP_LEVEL = ("name", "description", "extends", "variants", "tricks", *SECTIONS)


MAX_EXTENDS = 64  # a longer 'extends' chain is a mistake (the shipped ones are 1 deep)
MAX_NESTING = 16  # tables in tables: a scenario needs 5 ([variants.x.parallel.<mode>.finetune])
NAME_FIX = "use letters, digits, '_', '-', '.' or '+' (the name becomes part of result paths and records)."


def read_toml(path: Path) -> dict:
    """One TOML file as a table; a UTF-8 byte-order mark at its start is skipped (editors on Windows add it)."""
    problem = file_problem(path)
    if problem:
        missing = problem.endswith("does not exist")
        raise UserError("file not found." if missing else f"cannot read the file: {problem}.",
                        file=_shown_path(path), fix="check the path; scenario files live under scenarios/."
                        if missing else "give a readable UTF-8 TOML file.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read the file ({e.strerror}).", file=str(path),
                        fix="give a readable UTF-8 text file, not a folder.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (byte {e.start}).", file=str(path),
                        fix="save the scenario as UTF-8 text.") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"not valid TOML: {e}.", file=str(path),
                        fix="quote strings, use key = value, one [section] header per table.") from None
    except RecursionError:  # arrays nested thousands deep exhaust the parser's stack
        raise UserError("not valid TOML for a scenario: values are nested too deeply.", file=str(path),
                        fix=f"nest tables and arrays at most {MAX_NESTING} deep.") from None
    if _depth(table) > MAX_NESTING:
        raise UserError(f"tables or arrays are nested more than {MAX_NESTING} deep.", file=str(path),
                        fix="a scenario needs at most [variants.<name>.<section>.<key>] tables.")
    return table


def _shown_path(path: Path) -> str:
    """The path for an error line: NUL bytes shown escaped, an over-long path shortened."""
    text = repr(str(path))[1:-1] if "\0" in str(path) else str(path)
    return text if len(text) <= 200 else f"{text[:80]}...{text[-80:]}"


def _depth(value) -> int:
    """Nesting depth of tables and arrays, without recursion (a deep value must not overflow the stack)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d + 1)
            if d + 1 <= MAX_NESTING:  # deeper than that is refused anyway
                todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_with_extends(path: Path) -> dict:
    """The file's table merged over everything it extends (a loop, not recursion: chains may be long)."""
    chain: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    while True:
        try:
            path = path.resolve()
        except (OSError, RuntimeError, ValueError):  # symlink loop (RuntimeError before 3.13), NUL byte
            read_toml(path)  # raises with the reason
            raise
        if path in seen:
            names = " -> ".join(p.name for p in (*seen, path))
            raise UserError(f"'extends' forms a cycle ({names}).", file=str(seen[0]), key="extends",
                            fix="remove one of the 'extends' lines.")
        if len(seen) >= MAX_EXTENDS:
            raise UserError(f"the 'extends' chain is longer than {MAX_EXTENDS} files.", file=str(seen[0]),
                            key="extends", fix="extend a file that holds the shared keys directly.")
        seen.append(path)
        table = read_toml(path)
        parent = table.pop("extends", None)
        chain.append((path, table))
        if parent is None:
            break
        if not isinstance(parent, str) or not parent.strip():
            raise UserError("'extends' must name a scenario file." if isinstance(parent, str)
                            else "'extends' must be a file name string.", file=str(path), key="extends",
                            fix='write extends = "base.toml" (relative to this file), or remove the line.')
        parent_path = path.parent / parent
        problem = file_problem(parent_path)
        if problem and problem.endswith("does not exist"):
            raise UserError(f"extended file '{_shown_path(Path(parent))}' does not exist (looked in "
                            f"{parent_path.parent}).", file=str(path), key="extends",
                            fix="give a path relative to this file.")
        if problem:
            raise UserError(f"cannot read the extended file: {problem}.", file=str(path), key="extends",
                            fix="give a readable scenario file, relative to this file.")
        path = parent_path
    merged = chain[-1][1]
    for _, table in reversed(chain[:-1]):
        merged.pop("name", None)  # a scenario's name is its own
        merged = deep_merge(merged, table)
    return merged


def parse_override(text: str) -> tuple[list[str], object]:
    """'parallel.tp=2' -> (['parallel', 'tp'], 2); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise UserError(f"--set '{text}' is not of the form section.key=value.",
                        fix="write e.g. --set parallel.tp=2.")
    key, raw = text.split("=", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(table: dict, overrides: list[str]) -> dict:
    table = copy.deepcopy(table)
    for text in overrides:
        keys, value = parse_override(text)
        node = table
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set '{text}': '{k}' is not a section.", key=".".join(keys),
                                fix="name a key inside a section, e.g. --set parallel.tp=2.")
        node[keys[-1]] = value
    return table


def _type_name(tp) -> str:
    inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
    if typing.get_origin(inner) is list:  # list[list[int]] -> 'list of lists of int'
        return f"list of lists of {_type_name(typing.get_args(inner)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp, where: dict, key: str):
    """Check a TOML value against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for opt in options:
            if dataclasses.is_dataclass(opt) and isinstance(value, dict):  # its own errors name its keys
                return coerce(value, opt, where, key)
        for opt in options:
            try:
                return coerce(value, opt, where, key)
            except UserError:
                pass
        raise _type_error(value, options[0], where, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: keep it, the range check names it
            return value
    if tp is int and isinstance(value, bool):
        raise _type_error(value, tp, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, tp, where, key)
        (inner,) = typing.get_args(tp) or (object,)
        return [coerce(v, inner, where, key) for v in value]
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):  # a table inside a table (typed too)
        return build_section(tp, value, where, key)
    if tp is object or isinstance(value, tp):
        return value
    raise _type_error(value, tp, where, key)


def _type_error(value, tp, where, key) -> UserError:
    name = key.split(".")[-1]
    if isinstance(value, dict):  # [workload.lr] written as a table where lr = ... was meant
        section = key.rsplit(".", 1)[0]
        return UserError(f"expected {_article(_type_name(tp))}, got a table.", key=key,
                         fix=f"write {name} = {_example(tp, None)} under [{section}], not a [{key}] table.",
                         **where)
    return UserError(f"expected {_article(_type_name(tp))}, got {_shown(value)}.",
                     key=key, fix=f"write {name} = {_example(tp, value)}.", **where)


def _shown(value) -> str:
    """A TOML value as the user wrote it, with its TOML type name."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f'string "{value}"'
    kind = {int: "integer", float: "float", list: "array"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _article(name: str) -> str:
    if name.startswith("list of "):
        return "a " + name.replace(" int", " integers").replace(" float", " numbers").replace(" str", " strings")
    return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "list": "a list"}.get(name, name)


def _example(tp, value) -> str:
    """A value of type tp to suggest: the user's own value converted when that is unambiguous."""
    if tp in (int, float) and isinstance(value, (str, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and (tp is float or number.is_integer()):
            return str(int(number)) if tp is int else str(value).strip()  # "4" -> 4, "3e-4" -> 3e-4
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower()
    if tp is str and value is not None and not isinstance(value, (dict, list)):
        return f'"{str(value).lower() if isinstance(value, bool) else value}"'
    return {int: "2", float: "0.5", str: '"value"', bool: "true"}.get(tp, "[...]")


def build_section(cls: type, table, where: dict, section: str):
    if not isinstance(table, dict):
        raise UserError(f"'{section}' must be a table.", key=section,
                        fix=f"write [{section}] as a section header.", **where)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise UserError(f"unknown key '{key}' in [{section}]{did_you_mean(key, known)}.",
                            key=f"{section}.{key}",
                            fix=f"valid keys are: {', '.join(known)}.", **where)
        v = coerce(value, hints[key], where, f"{section}.{key}")
        bounds = known[key].metadata.get("range")
        why = out_of_range(v, bounds)
        if why:
            many = isinstance(v, list)
            integer = all(isinstance(x, int) for x in (v if many else [v]))
            what = ("integers" if integer else "numbers") if many else ("an integer" if integer else "a number")
            raise UserError(f"{key} = {v!r}: {why}." if many else f"{key} = {why}.", key=f"{section}.{key}",
                            fix=f"set {key} to {what} {describe_range(bounds)}.", **where)
        choices = known[key].metadata.get("choices")
        if choices and v not in choices:
            raise UserError(f"'{v}' is not one of {', '.join(map(str, choices))}"
                            f"{did_you_mean(str(v), map(str, choices))}.",
                            key=f"{section}.{key}", fix=f"choose one of {', '.join(map(str, choices))}.",
                            **where)
        values[key] = v
    return cls(**values)


def fill_model(model, where: dict):
    """Apply the preset under explicit keys, then derive defaults; every shape key ends up set."""
    if model.preset is not None:
        if model.preset not in PRESETS:
            raise UserError(f"unknown preset '{model.preset}'{did_you_mean(model.preset, PRESETS)}.",
                            key="model.preset", fix=f"choose one of {', '.join(PRESETS)}.", **where)
        for k, v in PRESETS[model.preset].items():
            if getattr(model, k) is None:
                setattr(model, k, v)
    for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
        if getattr(model, k) is None:
            raise UserError(f"the model's '{k}' is not set.", key=f"model.{k}",
                            fix=f"set [model] preset = \"tiny\" (or another preset) or {k} = <integer>.",
                            **where)
    if model.num_query_groups is None:
        model.num_query_groups = model.num_attention_heads
    if model.ffn_hidden_size is None:
        model.ffn_hidden_size = default_ffn(model.hidden_size)
    return model


def build_variant(table: dict, *, scenario: str, name: str, file: str, is_baseline: bool) -> VariantSpec:
    where = {"file": file, "variant": name}
    for key in table:
        # name/extends/variants were taken off the file's top level; here they came from a variant.
        if key in ("name", "description", "extends", "variants"):
            raise UserError(f"'{key}' belongs at the top of the file, not inside a variant.", key=key,
                            fix=f"move '{key}' out of [variants.{name}].", **where)
        if key not in TOP_LEVEL:
            raise UserError(f"unknown section '{key}'{did_you_mean(key, TOP_LEVEL)}.", key=key,
                            fix=f"sections are: {', '.join(SECTIONS)}, tricks, variants.", **where)
    modes, parallel = {}, table.get("parallel", {})
    if isinstance(parallel, dict):  # a parallel mode's table [parallel] <name> = {...} is typed by its plug-in
        for mname in [k for k in parallel if k in PARALLEL_MODES]:
            if parallel[mname] is not None:
                modes[mname] = build_section(PARALLEL_MODES[mname].config, parallel[mname], where,
                                             f"parallel.{mname}")
        known = [f.name for f in fields(SECTIONS["parallel"])] + list(PARALLEL_MODES)
        for key in parallel:
            if key not in known:
                raise UserError(f"unknown key '{key}' in [parallel]{did_you_mean(key, known)}.",
                                key=f"parallel.{key}", fix=f"valid keys are: {', '.join(known)}.", **where)
        table = {**table, "parallel": {k: v for k, v in parallel.items() if k not in PARALLEL_MODES}}
    sections = {s: build_section(cls, table.get(s, {}), where, s) for s, cls in SECTIONS.items()}
    tricks_table = table.get("tricks", {})
    if not isinstance(tricks_table, dict):
        raise UserError("'tricks' must be a table of [tricks.<name>] sections.", key="tricks",
                        fix="write [tricks.<name>] section headers.", **where)
    tricks = {}
    for tname, ttable in tricks_table.items():
        if tname not in TRICKS:
            raise UserError(f"unknown trick '{tname}'{did_you_mean(tname, TRICKS)}.",
                            key=f"tricks.{tname}",
                            fix=f"available: {', '.join(TRICKS) or 'none installed'}.", **where)
        tricks[tname] = build_section(TRICKS[tname].config, ttable, where, f"tricks.{tname}")
    fill_model(sections["model"], where)
    spec = VariantSpec(scenario=scenario, name=name, file=file, tricks=tricks, modes=modes,
                       is_baseline=is_baseline, **sections)
    check_variant(spec)
    for tname, tcfg in tricks.items():
        if TRICKS[tname].validate:
            TRICKS[tname].validate(spec, tcfg)
    return spec


def _check_name(name: str, file: str, key: str, what: str) -> None:
    """Scenario and variant names become result folders and record fields: printable, no path separators."""
    bad = (not name.strip() or len(name) > 100 or name in (".", "..")
           or any(c in "/\\" or not c.isprintable() or c.isspace() for c in name))
    if bad:
        raise UserError(f"{what} {name!r} is empty, too long or has spaces, slashes or control characters.",
                        file=file, key=key, fix=NAME_FIX)


def load_scenario(path: str | Path, overrides: list[str] = (), only: list[str] | None = None
                  ) -> list[VariantSpec]:
    """All variants of a scenario file, resolved and validated (raises UserError)."""
    registry.load()  # the techniques and parallel modes register themselves

    path = Path(path)
    file = str(path)
    table = load_with_extends(path)
    scenario = table.pop("name", path.stem)
    if not isinstance(scenario, str):
        raise UserError("'name' must be a string.", file=file, key="name", fix=f'write name = "{scenario}".')
    _check_name(scenario, file, "name", "scenario name")
    table.pop("description", None)
    variants = table.pop("variants", None)
    if variants is None or variants == {}:
        variants = {"default": {}}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise UserError("'variants' must hold tables: [variants.<name>].", file=file, key="variants",
                        fix="write [variants.baseline] with the keys that variant overrides.")
    # The baseline is read after --set, so that --set report.baseline=NAME moves it too.
    report = apply_overrides(table, list(overrides)).get("report", {})
    if not isinstance(report, dict):
        raise UserError("'report' must be a table.", file=file, key="report",
                        fix="write [report] as a section header.")
    for name in variants:
        _check_name(name, file, f"variants.{name}", "variant name")
    baseline = report.get("baseline", next(iter(variants)))
    if not isinstance(baseline, str) or baseline not in variants:
        raise UserError(f"baseline variant '{baseline}' is not defined{did_you_mean(baseline, variants)}.",
                        file=file, key="report.baseline", fix=f"choose one of {', '.join(variants)}.")
    if only:
        for name in only:
            if name not in variants:
                raise UserError(f"no variant '{name}'{did_you_mean(name, variants)}.", file=file,
                                key="--variant", fix=f"variants are: {', '.join(variants)}.")
    out = []
    for name, over in variants.items():
        if only and name not in only:
            continue
        merged = apply_overrides(deep_merge(table, over), list(overrides))
        out.append(build_variant(merged, scenario=scenario, name=name, file=file,
                                 is_baseline=name == baseline))
    return out
