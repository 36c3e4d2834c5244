"""Command line: ``python -m suite {run,validate,plan,report,compare,data,analyze,export-hf}``.

User errors (``UserError``) print one line and exit 2; bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from suite import registry
from suite.errors import UserError

DEFAULT_SCENARIO = str(Path(__file__).parent / "defaults" / "tiny.toml")


def _add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key in every variant, e.g. --set parallel.tp=2 (repeatable)")
    p.add_argument("--variant", dest="variants", action="append", default=None, metavar="NAME",
                   help="run only this variant (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="suite", description="Benchmark LLM efficiency techniques on "
                                     "megatron-core: scenarios in, result records and reports out.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scenario's variants and append result records",
                         description="Under torchrun: one SPMD program runs every variant that fits the "
                         "launched world size. Without torchrun: starts torchrun once per variant with "
                         "the process count that variant needs. Every variant leaves a record (ok, failed, "
                         "diverged, interrupted or skipped); exit 1 when any failed or diverged, 2 when one "
                         "cannot fit this machine, 130 after Ctrl-C.")
    run.add_argument("scenario", nargs="?", default=DEFAULT_SCENARIO,
                     help="scenario file (default: the embedded tiny CPU scenario)")
    _add_scenario_args(run)
    run.add_argument("--out", default=None, help="results folder (default: results/<scenario name>)")
    run.add_argument("--resume", action="store_true", help="skip variants already recorded as ok")
    run.add_argument("--nproc", type=int, default=None,
                     help="launcher only: processes per variant when dp is not set (default tp*pp)")
    run.add_argument("--slurm", default=None, metavar="partition=P[,time=MIN,account=A,gpus_per_node=N]",
                     help="submit one Slurm job per variant (through submitit), sized from its plan; "
                          "README: Multi-node")

    val = sub.add_parser("validate", help="check scenario files without running them",
                         description="Checks every scenario file given; --explain SECTION prints the keys "
                         "of a section instead (doc, type, default, range or choices).")
    val.add_argument("scenarios", nargs="*")
    val.add_argument("--explain", default=None, metavar="SECTION",
                     help="print every key of SECTION: model, parallel, workload, data, eval, report, "
                          "tricks.<name> or parallel.<mode>")
    _add_scenario_args(val)

    plan = sub.add_parser("plan", help="per variant: parameters, FLOPs/step, memory/GPU, GPUs")
    plan.add_argument("scenario")
    _add_scenario_args(plan)

    rep = sub.add_parser("report", help="markdown/csv/json comparison tables from result records")
    rep.add_argument("results", nargs="+", help="results folders or records.jsonl files")
    rep.add_argument("-o", "--output", default=None, help="write here instead of stdout (loss-curve PNGs beside it)")
    rep.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown")
    rep.add_argument("--target-loss", type=float, default=None,
                     help="validation loss the cost-at-equal-quality table compares at (default: the runs' "
                          "workload.target_loss, else the baseline's final validation loss)")

    cmp_ = sub.add_parser("compare", help="regression gate: exit 1 when CURRENT regressed from BASELINE",
                          description="Pairs variants, then measures by (name, point); a change counts when "
                          "its confidence interval excludes no change and it exceeds the minimum effect. "
                          "Exit 1 on a regression or a changed configuration, 0 otherwise (improvements "
                          "are listed), 2 on bad input.")
    cmp_.add_argument("current")
    cmp_.add_argument("baseline", nargs="+",
                      help="stored baseline: records files or result folders, read in order (a later file's run "
                           "of a variant is the newer one), e.g. the single-GPU baseline and then the one that "
                           "holds the 2-GPU variants")
    cmp_.add_argument("--max-slowdown", default="5%",
                      help="minimum effect for times (median ratio), e.g. 5%% (default)")
    cmp_.add_argument("--max-loss-increase", default="0.01",
                      help="minimum effect for lower-is-better means such as losses, absolute in their unit "
                           "(default 0.01 nats: perplexity x1.01)")
    cmp_.add_argument("--max-acc-drop", default="2",
                      help="minimum effect for higher-is-better means such as acc, in points (default 2)")
    cmp_.add_argument("--tolerance", default=None,
                      help="override every tolerance measure's own tolerance (peak memory), e.g. 10%%")
    cmp_.add_argument("--allow-config-change", action="store_true",
                      help="compare variants whose resolved configs differ instead of failing them")
    cmp_.add_argument("-o", "--output", default=None, help="also write the table here")

    export = sub.add_parser("export", help="result records in another tool's format (pytest-benchmark JSON)",
                            description="Writes every time measure with raw samples of the latest record of "
                            "each variant as one pytest-benchmark benchmark, so `pytest-benchmark compare` "
                            "(tables, --histogram, --csv) reads suite runs.")
    export.add_argument("results", nargs="+", help="results folders or records.jsonl files")
    export.add_argument("--format", choices=("pytest-benchmark",), default="pytest-benchmark")
    export.add_argument("-o", "--output", required=True, help="JSON file to write")

    data = sub.add_parser("data", help="corpora: tokenize and cache ahead of a run")
    data_what = data.add_subparsers(dest="data_command", required=True)
    prep = data_what.add_parser("prepare", help="tokenize and cache every variant's corpus; print token counts",
                                description="Tokens go to $SUITE_CACHE (default .cache/suite/tokens/), keyed "
                                "by the corpus content, the tokenizer and the split; runs then read them.")
    prep.add_argument("scenario")
    _add_scenario_args(prep)

    analyze = sub.add_parser("analyze", help="analyses that guide a technique's settings (added by plug-ins)")
    what = analyze.add_subparsers(dest="analysis", required=True)
    registry.load()
    for a in registry.ANALYSES.values():
        one = what.add_parser(a.name, help=a.help, description=a.description)
        one.add_argument("scenario")
        _add_scenario_args(one)
        a.arguments(one)
    exp = sub.add_parser("export-hf", help="write a variant's model as a Hugging Face folder (config.json + "
                         "safetensors)", description="Loads [model] init (a checkpoint saved at any TP/PP layout, "
                         "or hf:PATH) on one process and writes config.json, safetensors and the tokenizer files, "
                         "readable by transformers and lm-evaluation-harness.")
    exp.add_argument("scenario")
    _add_scenario_args(exp)
    exp.add_argument("-o", "--output", required=True, help="folder to write (new, empty, or an earlier export)")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="of the saved tensors (default: the hf: source's, else the model's)")
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """--verbose on the command and every subcommand (so it may follow the subcommand's arguments)."""
    parser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show the libraries' warnings and logs, which are hidden by default (suite.quiet)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_verbose(sub)


def explain(section: str) -> str:
    """Every key of a scenario section as a table: the schema's own doc(), type, default, range, choices."""
    import dataclasses

    from suite import registry
    from suite.errors import did_you_mean
    from suite.scenario.schema import SECTIONS

    registry.load()
    known = {**SECTIONS, **{f"tricks.{n}": t.config for n, t in registry.TRICKS.items()},
             **{f"parallel.{n}": m.config for n, m in registry.PARALLEL_MODES.items()}}
    if section not in known:
        raise UserError(f"no section '{section}'{did_you_mean(section, known)}.", key="--explain",
                        fix=f"sections are: {', '.join(known)}.")
    lines = [((known[section].__doc__ or "").strip().splitlines() or [f"[{section}]"])[0], ""]
    for f in dataclasses.fields(known[section]):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        meta = f.metadata
        allowed = (f"one of {', '.join(map(str, meta['choices']))}" if meta.get("choices")
                   else f"range {meta['range']}" if meta.get("range") else "")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"{f.name} ({kind}; default {'unset' if default is None else repr(default)}"
                     f"{'; ' + allowed if allowed else ''})")
        lines.append(f"    {meta.get('doc', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from suite import quiet

    quiet.install(getattr(args, "verbose", False))  # before anything imports megatron-core
    try:
        if args.command == "validate":
            from suite.scenario import load_scenario

            if args.explain:
                print(explain(args.explain))
                return 0
            if not args.scenarios:
                raise UserError("no scenario file given.", key="validate",
                                fix="write `suite validate FILE...` or `suite validate --explain SECTION`.")

            bad = 0
            for path in args.scenarios:  # every file is checked and reported; exit 2 if any is bad
                try:
                    variants = load_scenario(path, args.overrides, args.variants)
                except UserError as e:
                    print(f"error: {e}", file=sys.stderr)
                    bad += 1
                    continue
                print(f"{path}: ok ({len(variants)} variant{'s' * (len(variants) != 1)}: "
                      f"{', '.join(v.name for v in variants)})")
            if bad and len(args.scenarios) > 1:
                print(f"{bad} of {len(args.scenarios)} scenario files are invalid", file=sys.stderr)
            return 2 if bad else 0
        if args.command == "plan":
            from suite.plan import print_plan

            return print_plan(args.scenario, args.overrides, args.variants)
        if args.command == "run":
            from suite.launch import entry

            return entry.run(args)
        if args.command == "report":
            from suite.report.compare import parse_amount
            from suite.report.render import report_command

            if args.target_loss is not None:  # NaN, inf or a negative loss would silently match nothing
                args.target_loss = parse_amount(args.target_loss, "--target-loss", "2.5")
            return report_command(args)
        if args.command == "compare":
            from suite.report.compare import compare_command

            return compare_command(args)
        if args.command == "export":
            from suite.report.export import export_command

            return export_command(args)
        if args.command == "data":
            from suite.data.prepare import prepare_command
            from suite.scenario import load_scenario

            return prepare_command(load_scenario(args.scenario, args.overrides, args.variants))
        if args.command == "analyze":
            module, function = registry.ANALYSES[args.analysis].command.split(":")
            return getattr(importlib.import_module(module), function)(args)
        if args.command == "export-hf":
            from suite.launch.export_hf import export_command

            return export_command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
