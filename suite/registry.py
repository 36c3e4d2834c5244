"""The one plug-in table: techniques (``[tricks.<name>]``) and parallel modes (``[parallel] <name> = {...}``).

The core never names a plug-in: the scenario loader builds each plug-in's typed section from here,
validation calls its validator, the runner asks it for a workload, a layer spec, process groups, a
world size, and the record asks it for its layout keys and its metrics block. A plug-in registers
itself at import (``register``, ``register_mode``); ``load()`` imports the built-in ones listed in
``BUILTIN`` and then the modules named in the environment variable ``SUITE_PLUGINS`` (comma-separated
module names, importable from ``sys.path``): a technique or parallel mode kept outside suite is one
folder plus that variable. Each plug-in package must import without torch (``suite validate``,
``suite plan`` and the reporter run without it); its torch code is imported by its runtime factory.
A plug-in package may hold a torch-free ``report`` module: the reporter imports it (``report_modules``).

Names are unique: registering a second, different plug-in under a taken name raises (a bug, found at
import). Two plug-ins of one variant that answer the same exclusive hook (two workloads, two parallel
modes) are refused when the variant is validated, naming both (``conflicts``).

This module imports nothing of suite, so every floor may import it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

BUILTIN: tuple[str, ...] = ("suite.tricks.multilevel", "suite.tricks.random_ltd", "suite.tricks.mixture_of_depths",
                            "suite.tricks.stacking", "suite.tricks.speculative", "suite.tricks.early_exit",
                            "suite.parallel.cqil")
ENV = "SUITE_PLUGINS"


class TrickRuntime:
    """Hooks a technique may override; the defaults leave training unchanged."""

    def layer_spec(self, spec):
        """The megatron-core layer ModuleSpec to build the model with."""
        return spec

    def attach(self, chunks) -> None:
        """Called once with the built model chunks (megatron-core GPTModels, before the DDP and bf16 wrappers),
        e.g. to register forward hooks."""

    def begin_step(self, step: int) -> None:
        """Called before every optimizer step (training only)."""

    def begin_microbatch(self, sample_offset: int) -> None:
        """Called before each micro-batch's forward with the index of its first sample in the
        global batch (identical on every TP/PP rank that processes it)."""

    def step_flops(self, step: int) -> int | None:
        """Model FLOPs of optimizer step ``step`` if the technique changes them, else None."""
        return None

    def lr_units(self) -> tuple[float, Callable[[int], float]] | None:
        """(units per baseline step, units consumed by step t) to drive the LR schedule by
        something other than steps, else None."""
        return None

    def extra(self) -> dict:
        """Technique-specific measurements for the record's metrics.extra."""
        return {}

    def measures(self) -> list[dict]:
        """Record measures of the technique's own metrics (declared with ``suite.metrics.declare``), which
        ``suite report`` and ``suite compare`` read like the core's; [] when it has none."""
        return []

    def step_point(self, step: int) -> dict:
        """Where step ``step`` sits in the technique's schedule when it changes the step's shape (e.g.
        {"kept": 256}), else {}: the record then holds one step-time measure per schedule position
        instead of one pooled spread."""
        return {}


@dataclass
class Trick:
    """A technique: its ``[tricks.<name>]`` section and what it changes."""

    name: str
    config: type  # dataclass for [tricks.<name>]
    validate: Callable | None = None  # (variant, trick_config) -> None; raises UserError
    runtime: Callable | None = None  # (variant, trick_config) -> TrickRuntime
    workload: str | None = None  # module replacing the workload (``run``/``metrics``, see suite.workloads)
    kinds: tuple[str, ...] = ("train",)  # the [workload] kinds it applies to (others refuse its section)
    with_modes: bool = False  # its workload runs the variant's parallel mode too (builds through its layer spec)
    # (variant, cfg) -> {"layout": text, "memory": bytes per GPU, "flops_per_step": the run's mean} for `suite plan`
    plan_row: Callable | None = None


class ModeRuntime:
    """A parallel mode's torch side on one rank, made before the model is built (it may create its
    process groups then) and closed after the variant."""

    def layer_spec(self, spec):
        """The megatron-core layer (or block) spec this rank builds: e.g. only the layers it runs."""
        return spec

    def close(self) -> None:
        """Frees what the runtime made (process groups)."""


@dataclass
class ParallelMode:
    """A way to lay one model over processes beyond megatron's tp/pp/dp, written as the table
    ``[parallel] <name> = {...}`` (its typed ``config`` dataclass, with ``doc()`` fields).

    Every hook is optional:

        validate(spec, cfg)       raises UserError; runs after the core checks
        world_size(spec, cfg)     processes the variant needs, or None: the core rule (tp x pp x dp)
        width                     the factor's name in the world-size message, e.g. "ring degree"
        runtime(spec, cfg, timeout_s)
                                  a ``ModeRuntime`` (process groups with that collective timeout, layer
                                  spec) or None, on every rank
        plan_row(spec, cfg)       {"layout": text appended to `suite plan`'s layout column, "layers":
                                  decoder layers each GPU holds} for the plan's memory estimate
        layout(spec, cfg)         the record's ``layout`` keys the mode adds (e.g. its degree)
        describe(spec, cfg)       the record's ``metrics.<name>`` block (null for variants without the mode)
        accuracy(spec, cfg, model, quality, data, ctx, fault)
                                  the accuracy workload's extra model blocks ({"name": quality block}):
                                  ``quality(logprobs, kl)`` scores a form of the one-process model
        doc                       the key's one-line documentation, as ``doc()`` gives every core key

    Checkpoints load into a mode's ranks through megatron's sharded state dict, keyed by each
    layer's global number (``suite.models.checkpoint``): a mode whose layers keep their global
    numbers needs no mapping of its own.
    """

    name: str
    config: type
    doc: str = ""
    validate: Callable | None = None
    world_size: Callable | None = None
    width: str | None = None
    runtime: Callable | None = None
    plan_row: Callable | None = None
    layout: Callable | None = None
    describe: Callable | None = None
    accuracy: Callable | None = None


@dataclass
class Analysis:
    """A ``suite analyze <name>`` command a plug-in adds: ``arguments(parser)`` adds its options (the
    scenario argument is added for it); ``command`` is "module:function", imported only when it runs,
    called with the parsed arguments and returning the exit code."""

    name: str
    help: str
    description: str
    arguments: Callable
    command: str


TRICKS: dict[str, Trick] = {}
PARALLEL_MODES: dict[str, ParallelMode] = {}
ANALYSES: dict[str, Analysis] = {}
_loaded: list[str] = []


def _add(table: dict, kind: str, item):
    known = table.setdefault(item.name, item)
    if known is not item:
        raise ValueError(f"{kind} {item.name!r} is registered twice ({known!r} and {item!r}): "
                         "plug-in names must be unique")
    return item


def register(trick: Trick) -> Trick:
    """Adds a technique; a second one of the same name raises."""
    return _add(TRICKS, "technique", trick)


def register_mode(mode: ParallelMode) -> ParallelMode:
    """Adds a parallel mode; a second one of the same name raises."""
    return _add(PARALLEL_MODES, "parallel mode", mode)


def register_analysis(analysis: Analysis) -> Analysis:
    """Adds a ``suite analyze`` command; a second one of the same name raises."""
    return _add(ANALYSES, "analysis", analysis)


def plugin_modules() -> list[str]:
    """The built-in plug-in modules, then those named in ``SUITE_PLUGINS``."""
    extra = [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]
    return [*BUILTIN, *(m for m in extra if m not in BUILTIN)]


def report_modules() -> list[str]:
    """The plug-ins' report modules (each package's ``report`` submodule, where it has one), in the
    plug-ins' order, for ``suite.report.plugins``; found without importing torch."""
    import importlib.util

    out = []
    for module in plugin_modules():
        try:
            found = importlib.util.find_spec(f"{module}.report")
        except ModuleNotFoundError:  # a plain module (not a package) has no report submodule
            found = None
        if found is not None:
            out.append(f"{module}.report")
    return out


def load() -> None:
    """Imports every plug-in module (each registers itself); cheap after the first call."""
    for module in plugin_modules():
        if module not in _loaded:
            importlib.import_module(module)
            _loaded.append(module)


def trick(name: str) -> Trick:
    """The registered technique ``name`` (plug-ins loaded first: a rank may get a variant it did not parse)."""
    load()
    return TRICKS[name]


def mode(name: str) -> ParallelMode:
    """The registered parallel mode ``name`` (plug-ins loaded first)."""
    load()
    return PARALLEL_MODES[name]


def conflicts(spec) -> list[tuple[str, str, str]]:
    """(key, message, fix) for every exclusive hook two plug-ins of ``spec`` both answer."""
    out = []
    workloads = [name for name in spec.tricks if trick(name).workload]
    if len(workloads) > 1:
        out.append(("tricks", f"techniques {' and '.join(workloads)} both replace the workload loop; one "
                    "variant runs one loop.", "compare them in separate variants."))
    elif workloads and len(spec.tricks) > 1:  # its loop does not run the other techniques' hooks
        others = [name for name in spec.tricks if name != workloads[0]]
        out.append(("tricks", f"{workloads[0]} runs its own workload loop and cannot be combined with "
                    f"{', '.join(others)}.", "compare the techniques in separate variants."))
    if len(spec.modes) > 1:
        names = list(spec.modes)
        out.append((f"parallel.{names[1]}", f"parallel modes {' and '.join(names)} both lay out the model's "
                    "layers and processes; one variant uses one.", "compare them in separate variants."))
    if spec.modes and workloads and not trick(workloads[0]).with_modes:
        out.append((f"parallel.{next(iter(spec.modes))}", f"parallel mode {next(iter(spec.modes))} and "
                    f"technique {workloads[0]} (its own workload loop) cannot be combined.",
                    "compare them in separate variants."))
    return out


def mode_blocks(spec) -> dict:
    """The record's ``metrics.<mode>`` block of every registered parallel mode (None where unused)."""
    load()
    out = {}
    for name, m in PARALLEL_MODES.items():
        cfg = spec.modes.get(name)
        out[name] = m.describe(spec, cfg) if cfg is not None and m.describe else None
    return out


def mode_layout(spec) -> dict:
    """The record's ``layout`` keys the variant's parallel modes add."""
    out = {}
    for name, cfg in spec.modes.items():
        if mode(name).layout:
            out.update(mode(name).layout(spec, cfg))
    return out


def mode_runtimes(spec, timeout_s: float | None = None) -> list[ModeRuntime]:
    """This rank's runtimes of the variant's parallel modes (made in order; close them after)."""
    made = [mode(n).runtime(spec, cfg, timeout_s) for n, cfg in spec.modes.items() if mode(n).runtime]
    return [r for r in made if r is not None]
