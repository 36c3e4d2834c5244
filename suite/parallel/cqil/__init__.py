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

Deployment (``layer.py``): world = tp × degree. CQIL rank c = global rank // tp (megatron
orders ranks TP-fastest, so the CQIL ranks of one TP shard are the ranks with equal rank % tp, i.e.
megatron's data-parallel dimension). CQIL rank c builds the c-th layer of every group and *all*
layers outside groups: those run redundantly on every CQIL rank, which costs memory but no
latency, where running them on one GPU would add a broadcast per step. After each group layer an
all-reduce over the CQIL ranks sums the deltas; with bypass, an all-gather between attention and
MLP hands every rank the attention outputs of its group (one collective, deadlock-free, and
capturable in a CUDA graph; with d = 1 and degree 2 it moves the same bytes as a send).

Accuracy (``[workload] kind = "accuracy"``): ``finetune.py`` computes the same function on one
process and fine-tunes LoRA adapters with distillation to recover quality (``finetune`` below).

A parallel mode (``suite.registry``): this module is torch-free (the typed ``[parallel] cqil`` table,
validation, layer assignment, world size, plan row, record layout) and registers the mode;
``layer.py`` holds the megatron-core layer and the process groups, ``finetune.py`` the one-process
function and its recovery, ``report.py`` what CQIL adds to reports. Nothing outside this folder
names CQIL, except the registry's list of built-in plug-ins.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from suite import errors
from suite.fields import doc
from suite.registry import Analysis, ModeRuntime, ParallelMode, register_analysis, register_mode

LAYER_RANGE = "[0, 4096]"  # start, end, degree, bypass: layer counts (model.num_layers <= 4096)


@dataclass(frozen=True)
class Finetune:
    """``[parallel.cqil.finetune]``: the LoRA + distillation recovery (``finetune.finetune``)."""

    steps: int = doc("Optimizer steps of the fine-tune.", 200, range="[1, 10000000]")
    rank: int = doc("LoRA rank r.", 32, range="[1, 65536]")
    alpha: float = doc("LoRA scale numerator (adapters scaled by alpha / r).", 32.0, range="(0, 1000000]")
    lr: float = doc("AdamW learning rate of the adapters (constant).", 1e-4, range="(0, 100]")
    batch: int = doc("Windows of seq_length tokens per step.", 8, range="[1, 1048576]")
    weight_decay: float = doc("AdamW weight decay of the adapters.", 0.1, range="[0, 100]")


@dataclass
class CQILConfig:
    """``[parallel] cqil = {...}``: layer groups that run in parallel (inference), or whose function the
    accuracy workload measures on one process."""

    groups: list[list[int]] | None = doc("Explicit groups of consecutive 0-based layer ids, e.g. "
                                         "[[12, 13], [14, 15]] (instead of start/end/degree).", range=LAYER_RANGE)
    start: int | None = doc("Compact form: first grouped layer (0-based).", range=LAYER_RANGE)
    end: int | None = doc("Compact form: the layer after the last grouped one (exclusive).", range=LAYER_RANGE)
    degree: int | None = doc("Compact form: layers per group = CQIL ranks (GPUs per TP shard).", range=LAYER_RANGE)
    bypass: int = doc("Bypass distance d: a group's k-th layer adds the attention outputs of the previous "
                      "min(d, k) layers (0: none, the authors' recommendation).", 0, range=LAYER_RANGE)
    finetune: Finetune | None = doc("accuracy workload: recover quality with LoRA + distillation, "
                                    "{steps, rank, alpha, lr, batch, weight_decay}.")


KEYS = tuple(f.name for f in fields(CQILConfig))
FINETUNE_KEYS = tuple(f.name for f in fields(Finetune))


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


def degree_of(cfg: CQILConfig | None) -> int:
    """CQIL ranks a (validated) ``[parallel] cqil`` table needs; 1 without CQIL."""
    if cfg is None:
        return 1
    return cfg.degree if cfg.degree is not None else len(cfg.groups[0])


def plan_of(spec) -> CQILPlan | None:
    """The variant's CQIL plan, validated against the model and layout (raises UserError)."""
    cfg = spec.modes.get("cqil")
    return None if cfg is None else validate(spec, cfg)


def validate(spec, cfg: CQILConfig) -> CQILPlan:
    """The plan of ``cfg`` (types and ranges were checked by the loader); raises UserError."""

    def fail(message: str, fix: str, key: str = "parallel.cqil"):
        errors.fail(spec, key, message, fix)

    example = "write cqil = { start = 12, end = 30, degree = 2, bypass = 0 } or cqil = { groups = [[12, 13]] }."
    L = spec.model.num_layers
    bypass = cfg.bypass
    if cfg.groups is not None:
        if cfg.start is not None or cfg.end is not None:
            fail("give either groups or start/end, not both.", example)
        if not cfg.groups or not all(cfg.groups):
            fail("groups must be a non-empty list of non-empty lists of layer ids.",
                 "write groups = [[12, 13], [14, 15]].", "parallel.cqil.groups")
        groups = sorted(tuple(g) for g in cfg.groups)
    else:
        if cfg.start is None or cfg.end is None or cfg.degree is None:
            fail("the compact form needs start, end and degree.", example)
        start, end, degree = cfg.start, cfg.end, cfg.degree
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
    if cfg.degree is not None and cfg.degree != degree:
        fail(f"degree {cfg.degree} disagrees with the group size {degree}.",
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
    if cfg.finetune is not None and kind != "accuracy":
        fail("the CQIL fine-tune runs in the accuracy workload.",
             'set [workload] kind = "accuracy", or remove finetune.', "parallel.cqil.finetune")
    if kind == "accuracy":  # one process computes the concurrent model's function
        if cfg.finetune is None and spec.workload.save_checkpoint:
            fail("only the fine-tuned model (adapters merged) is saved; without finetune the weights are "
                 "the loaded ones.", "add finetune = {...} or remove save_checkpoint.", "workload.save_checkpoint")
        if cfg.finetune is not None and spec.workload.seq_length < 2:
            errors.fail(spec, "workload.seq_length", "the fine-tune needs windows of at least 2 tokens.",
                        "set seq_length = 512 or so.")
        return CQILPlan(groups=tuple(groups), bypass=bypass, num_layers=L)
    if p.pp != 1 or (p.vpp or 1) != 1:
        fail("CQIL replaces pipeline parallelism over the grouped layers; it runs with pp = 1.",
             "set pp = 1 and remove vpp.", "parallel.pp")
    if p.dp is not None and p.dp != degree:
        fail(f"CQIL takes megatron's data-parallel dimension: dp must be the CQIL degree {degree}, got {p.dp}.",
             "remove dp (it is derived as tp x degree processes).", "parallel.dp")
    return CQILPlan(groups=tuple(groups), bypass=bypass, num_layers=L)


def finetune_of(spec) -> Finetune | None:
    """The variant's ``[parallel.cqil.finetune]``, or None."""
    cfg = spec.modes.get("cqil")
    return None if cfg is None else cfg.finetune


# --- the parallel mode's hooks --------------------------------------------------------------------

def world_size(spec, cfg: CQILConfig) -> int | None:
    """Inference: one model on tp x degree processes (never replicated); accuracy: the core's one."""
    return spec.parallel.tp * spec.parallel.pp * degree_of(cfg) if spec.workload.kind == "inference" else None


def plan_row(spec, cfg: CQILConfig) -> dict:
    """Every rank holds the layers outside groups and one layer of each group."""
    plan = validate(spec, cfg)
    return {"layout": f" cqil{plan.degree}", "layers": plan.depth}


def layout(spec, cfg: CQILConfig) -> dict:
    return validate(spec, cfg).layout() if spec.workload.kind == "inference" else {}


def describe(spec, cfg: CQILConfig) -> dict:
    return validate(spec, cfg).describe()


class Runtime(ModeRuntime):
    """This rank's CQIL process groups and decoder block (``layer.block_spec``)."""

    def __init__(self, spec, cfg: CQILConfig, timeout_s: float | None = None):
        from suite.parallel.cqil import layer

        self.plan, self.layer = validate(spec, cfg), layer
        self.group, self.rank, self.groups = layer.new_groups(spec.parallel.tp, self.plan.degree, timeout_s=timeout_s)

    def layer_spec(self, spec):
        return self.layer.block_spec(spec, self.plan, self.rank, self.group)

    def close(self) -> None:
        import torch.distributed as dist

        for g in self.groups:
            dist.destroy_process_group(g)
        self.groups = []


def runtime(spec, cfg: CQILConfig, timeout_s: float | None = None):
    return Runtime(spec, cfg, timeout_s) if spec.workload.kind == "inference" else None


def accuracy(spec, cfg: CQILConfig, model, quality, data, ctx, fault) -> dict:
    """The concurrent model's blocks (and, with ``finetune``, the fine-tune's and the recovered model's)."""
    from suite.parallel.cqil import finetune as ft

    plan, tune, vocab, seq = validate(spec, cfg), cfg.finetune, spec.model.vocab_size, spec.workload.seq_length
    device = next(model.parameters()).device

    def scored(lora=None) -> dict:
        return quality(lambda tokens: ft.logprobs(model, tokens.to(device), plan, vocab),
                       lambda heldout: ft.heldout_kl(model, plan, lora, heldout, seq, vocab))

    out = {"concurrent": scored()}
    ctx.log(f"CQIL: perplexity {out['concurrent']['perplexity']:.3f}, "
            f"KL to the original {out['concurrent']['kl_to_original']:.5f}")
    fault(0)
    if tune is not None:
        lora, out["finetune"] = ft.finetune(model, plan, tune, data.train, seq, vocab, spec.workload.seed, ctx.log)
        out["finetuned"] = scored(lora)
        ctx.log(f"CQIL after the fine-tune: perplexity {out['finetuned']['perplexity']:.3f}, "
                f"KL to the original {out['finetuned']['kl_to_original']:.5f}")
        if spec.workload.save_checkpoint:  # the recovered weights, for [model] init or `suite export-hf`
            from suite.models import checkpoint

            lora.merge()
            checkpoint.save(spec, [model], ctx.log)
        else:
            lora.remove()
    return out


register_mode(ParallelMode(
    name="cqil", config=CQILConfig, validate=validate, world_size=world_size, width="CQIL degree",
    runtime=runtime, plan_row=plan_row, layout=layout, describe=describe, accuracy=accuracy,
    doc="CQIL layer groups run in parallel (inference): {groups = [[12, 13], ...], bypass = 0} or {start = 12, "
        "end = 30 (exclusive), degree = 2, bypass = 0}; needs tp x degree GPUs. With kind = 'accuracy' (one "
        "process) also finetune = {steps, rank, alpha, lr, batch, weight_decay}."))


def _similarity_arguments(p) -> None:
    p.add_argument("--threshold", type=float, default=0.95, help="least cosine similarity within a group")
    p.add_argument("--degree", type=int, default=2, help="layers per suggested group (default 2)")
    p.add_argument("--batches", type=int, default=None, help="held-out batches (default: workload.eval_batches)")
    p.add_argument("-o", "--output", default=None, help="folder (default: results/<scenario>/similarity)")


register_analysis(Analysis(
    name="similarity", help="cosine similarity of consecutive layers' inputs; CQIL groups",
    description="Runs the scenario's model (first variant, or --variant) on held-out batches on one process "
                "and writes a table, a heat map and suggested CQIL groups.",
    arguments=_similarity_arguments, command="suite.parallel.cqil.similarity:similarity_command"))
