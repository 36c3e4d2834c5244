"""CQIL: consecutive layers run in parallel on several GPUs (Zou et al., ACL 2024, arXiv 2404.06709).

Configured as ``[parallel] cqil = { groups = [[12, 13], [14, 15]], bypass = 0 }`` or compactly as
``cqil = { start = 12, end = 30, degree = 2, bypass = 0 }`` (``end`` exclusive, as in the authors'
adapter names ``S12-E30-P2-D0``: layers 12..29 in groups of 2). Layer ids are 0-based; every group
is a run of ``degree`` consecutive layers; groups do not overlap.

The computation. A group with input h gives every one of its layers h and outputs
``h + Σ_j (layer_j(h) − h)``; layers outside groups run as usual. With bypass distance d, the k-th
layer of a group (k ≥ 1) adds the attention outputs of the previous ``min(d, k)`` layers of the
group to its residual stream after attention, before the post-attention norm and MLP:

    a_j = attn_j(norm(h));  m_j = h + a_j + Σ_{i=1..min(d,k)} a_{j−i};  layer_j(h) = m_j + mlp_j(norm(m_j))

This is the authors' code (``modeling_llama.py``: the bypass is added in place to the tensor the
residual aliases), so a bypassed attention output also lands in the receiving layer's delta and is
counted twice in the group's output. The paper's figure only feeds it to the next MLP's input. We
follow the code because the released LoRA adapters and the published d = 1 accuracies were made
with it; the two variants cost the same time (one all-gather, one add), so latency numbers hold
for either.

Deployment (``cqil_layer.py``): world = tp × degree. CQIL rank c = global rank // tp (megatron
orders ranks TP-fastest, so the CQIL ranks of one TP shard are the ranks with equal rank % tp, i.e.
megatron's data-parallel dimension). CQIL rank c builds the c-th layer of every group and *all*
layers outside groups: those run redundantly on every CQIL rank, which costs memory but no
latency, where running them on one GPU would add a broadcast per step. After each group layer an
all-reduce over the CQIL ranks sums the deltas; with bypass, an all-gather between attention and
MLP hands every rank the attention outputs of its group (one collective, deadlock-free, and
capturable in a CUDA graph; with d = 1 and degree 2 it moves the same bytes as a send).

Accuracy (``[workload] kind = "accuracy"``): ``cqil_finetune.py`` computes the same function on one
process and fine-tunes LoRA adapters with distillation to recover quality (``finetune`` below).

This module is torch-free (config, validation, layer assignment); ``cqil_layer.py`` holds the
megatron-core layer and the process groups.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from suite import errors
from suite.errors import did_you_mean

KEYS = ("groups", "start", "end", "degree", "bypass", "finetune")


@dataclass(frozen=True)
class Finetune:
    """``[parallel.cqil.finetune]``: the LoRA + distillation recovery (``cqil_finetune.finetune``)."""

    steps: int = 200
    rank: int = 32
    alpha: float = 32.0
    lr: float = 1e-4
    batch: int = 8
    weight_decay: float = 0.1


FINETUNE_KEYS = tuple(f.name for f in fields(Finetune))
# Ranges in suite.scenario.schema's notation (this table is untyped, outside the schema's dataclasses).
FINETUNE_RANGES = {"steps": "[1, 10000000]", "rank": "[1, 65536]", "alpha": "(0, 1000000]", "lr": "(0, 100]",
                   "batch": "[1, 1048576]", "weight_decay": "[0, 100]"}
LAYER_RANGE = "[0, 4096]"  # start, end, degree, bypass, group ids: layer counts (model.num_layers <= 4096)


@dataclass(frozen=True)
class CQILPlan:
    groups: tuple[tuple[int, ...], ...]  # ascending, consecutive, disjoint, all of one size
    bypass: int
    num_layers: int

    @property
    def degree(self) -> int:
        return len(self.groups[0])

    @property
    def depth(self) -> int:
        """Layers on the critical path: every group counts once."""
        return self.num_layers - sum(len(g) - 1 for g in self.groups)

    def layers_on(self, cqil_rank: int) -> list[tuple[int, int | None]]:
        """(global layer id, position in its group or None) of the layers CQIL rank c builds, in order."""
        first = {g[0]: g for g in self.groups}
        grouped = {layer for g in self.groups for layer in g}
        out = []
        for layer in range(self.num_layers):
            if layer in first:
                out.append((first[layer][cqil_rank], cqil_rank))
            elif layer not in grouped:
                out.append((layer, None))
        return out

    def layout(self) -> dict:
        """The record's ``layout`` keys: the ranks megatron's parallel_state counts as data parallel hold
        the layers of a CQIL group (same data), so data parallelism is 1 and the CQIL degree is the width."""
        return {"dp": 1, "cqil_degree": self.degree}

    def describe(self) -> dict:
        """The record's ``metrics.cqil`` block."""
        return {"degree": self.degree, "groups": [list(g) for g in self.groups], "bypass": self.bypass,
                "depth": self.depth, "layers_per_gpu": len(self.layers_on(0))}


def degree_of(table: dict | None) -> int:
    """CQIL ranks a (validated) ``parallel.cqil`` table needs; 1 without CQIL."""
    if not table:
        return 1
    return table["degree"] if "degree" in table else len(table["groups"][0])


def plan_of(spec) -> CQILPlan | None:
    """The variant's CQIL plan, validated against the model and layout (raises UserError)."""
    table = spec.parallel.cqil
    if table is None:
        return None

    def fail(message: str, fix: str, key: str = "parallel.cqil"):
        errors.fail(spec, key, message, fix)

    example = "write cqil = { start = 12, end = 30, degree = 2, bypass = 0 } or cqil = { groups = [[12, 13]] }."
    for key, value in table.items():
        if key not in KEYS:
            fail(f"unknown key '{key}'{did_you_mean(key, KEYS)}.", f"valid keys are: {', '.join(KEYS)}.",
                 f"parallel.cqil.{key}")
        if key not in ("groups", "finetune") and (not isinstance(value, int) or isinstance(value, bool)):
            fail(f"expected an integer, got {value!r}.", example, f"parallel.cqil.{key}")
        if key not in ("groups", "finetune") and not 0 <= value <= 4096:
            fail(f"{key} = {value} is outside {LAYER_RANGE}.", f"set {key} to a layer count of the model.",
                 f"parallel.cqil.{key}")
    L = spec.model.num_layers
    bypass = table.get("bypass", 0)
    if "groups" in table:
        if "start" in table or "end" in table:
            fail("give either groups or start/end, not both.", example)
        groups = table["groups"]
        if (not isinstance(groups, list) or not groups
                or not all(isinstance(g, list) and g and all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in g) for g in groups)):
            fail("groups must be a non-empty list of non-empty lists of layer ids.",
                 "write groups = [[12, 13], [14, 15]].", "parallel.cqil.groups")
        groups = sorted(tuple(g) for g in groups)
    else:
        if "start" not in table or "end" not in table or "degree" not in table:
            fail("the compact form needs start, end and degree.", example)
        start, end, degree = table["start"], table["end"], table["degree"]
        if degree < 1:
            fail(f"degree must be at least 1, got {degree}.", "use degree = 2 or 4.", "parallel.cqil.degree")
        if not 0 <= start < end <= L:
            fail(f"start {start} and end {end} (exclusive) must satisfy 0 <= start < end <= num_layers {L}.",
                 f"pick a span inside layers 0..{L - 1}, e.g. start = 0, end = {L - L % degree}.",
                 "parallel.cqil.end")
        if (end - start) % degree:
            fail(f"the span {start}..{end - 1} has {end - start} layers, not a multiple of degree {degree}.",
                 f"set end = {end - (end - start) % degree} or choose another degree.", "parallel.cqil.end")
        groups = [tuple(range(a, a + degree)) for a in range(start, end, degree)]
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        fail(f"groups have different sizes {sorted(sizes)}; every group runs one layer per CQIL rank.",
             "give every group the same number of layers (the CQIL degree).", "parallel.cqil.groups")
    degree = len(groups[0])
    if "degree" in table and table["degree"] != degree:
        fail(f"degree {table['degree']} disagrees with the group size {degree}.",
             "remove degree or make it equal to the group size.", "parallel.cqil.degree")
    for g in groups:
        if list(g) != list(range(g[0], g[0] + len(g))):
            fail(f"group {list(g)} is not a run of consecutive layers.",
                 "list consecutive layer ids, e.g. [14, 15].", "parallel.cqil.groups")
        if g[0] < 0 or g[-1] >= L:
            fail(f"group {list(g)} is outside the model's layers 0..{L - 1}.",
                 f"use layer ids between 0 and {L - 1}.", "parallel.cqil.groups")
    for a, b in zip(groups, groups[1:]):
        if b[0] <= a[-1]:
            fail(f"groups {list(a)} and {list(b)} overlap.", "list each layer in at most one group.",
                 "parallel.cqil.groups")
    if not 0 <= bypass < degree:
        fail(f"bypass {bypass} must be between 0 and degree - 1 = {degree - 1}.",
             "use bypass = 0 (the authors' recommendation) or 1.", "parallel.cqil.bypass")
    p = spec.parallel
    kind = spec.workload.kind
    if kind not in ("inference", "accuracy"):
        fail("CQIL runs in the inference workload (latency) and the accuracy workload (quality and its "
             "recovery); training under CQIL is not implemented.",
             'set [workload] kind = "inference" or "accuracy".', "workload.kind")
    if "finetune" in table and kind != "accuracy":
        fail("the CQIL fine-tune runs in the accuracy workload.",
             'set [workload] kind = "accuracy", or remove finetune.', "parallel.cqil.finetune")
    if kind == "accuracy":  # one process computes the concurrent model's function
        finetune_of(spec)
        return CQILPlan(groups=tuple(groups), bypass=bypass, num_layers=L)
    if p.pp != 1 or (p.vpp or 1) != 1:
        fail("CQIL replaces pipeline parallelism over the grouped layers; it runs with pp = 1.",
             "set pp = 1 and remove vpp.", "parallel.pp")
    if p.dp is not None and p.dp != degree:
        fail(f"CQIL takes megatron's data-parallel dimension: dp must be the CQIL degree {degree}, got {p.dp}.",
             "remove dp (it is derived as tp x degree processes).", "parallel.dp")
    return CQILPlan(groups=tuple(groups), bypass=bypass, num_layers=L)


def finetune_of(spec) -> Finetune | None:
    """The variant's ``[parallel.cqil.finetune]``, or None (raises UserError)."""
    table = (spec.parallel.cqil or {}).get("finetune")
    if table is None:
        return None
    from suite.scenario.schema import describe_range, out_of_range  # here: the schema imports this module

    key = "parallel.cqil.finetune"
    if not isinstance(table, dict):
        errors.fail(spec, key, f"expected a table, got {table!r}.", "write finetune = { steps = 200, rank = 32 }.")
    for name, value in table.items():
        if name not in FINETUNE_KEYS:
            errors.fail(spec, f"{key}.{name}", f"unknown key '{name}'{did_you_mean(name, FINETUNE_KEYS)}.",
                        f"valid keys are: {', '.join(FINETUNE_KEYS)}.")
        integer = name in ("steps", "rank", "batch")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
                or out_of_range(value, FINETUNE_RANGES[name]):
            errors.fail(spec, f"{key}.{name}", f"expected {'an integer' if integer else 'a number'} "
                        f"{describe_range(FINETUNE_RANGES[name])}, got {value!r}.",
                        f"set e.g. {name} = {getattr(Finetune(), name)!r}.")
    if spec.workload.seq_length < 2:
        errors.fail(spec, "workload.seq_length", "the fine-tune needs windows of at least 2 tokens.",
                    "set seq_length = 512 or so.")
    return Finetune(**table)
