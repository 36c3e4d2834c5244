"""Speculative decoding with greedy acceptance: a cheap draft proposes k tokens, the model verifies them
in one forward and keeps the longest prefix it agrees with, plus its own next token.

One verify step, with x the model's latest greedy token at position p (not yet fed to it)::

    draft:   x → d1, d1 → d2, ..., d(k-1) → dk          k one-token forwards on the draft's KV cache
    target:  [x, d1, ..., dk] at positions p..p+k       ONE forward on the target's KV cache → g0..gk
    accept:  n = longest prefix with d(i+1) = g(i)      emit d1..dn, then gn (n + 1 tokens)
    rollback both caches to p + n: the next x is gn at p + n + 1

Every emitted token is the target's greedy choice given the tokens before it (d(i+1) = g(i) for the
accepted ones, gn is the target's own), so the output is token-for-token the target's greedy output
whatever the draft proposes: the draft changes the speed, never the text (``tests/test_speculative.py``
checks it). Rollback is free: the caches are fixed buffers with a position mask, so positions past the
accepted length are masked out and overwritten later.

Drafts (``draft``):

* ``"layers:N"`` — self-speculative (LayerSkip, arXiv 2404.16710): the target's first N layers, then its
  final norm and LM head; no second model. Its layers are the target's, so it shares the target's
  KV cache: the verify forward rewrites those layers' K/V for the proposed positions, and nothing needs
  catching up after a step.
* a table ``{ preset = ..., init = ... }`` — a second model ([model]'s keys; vocab_size and
  max_sequence_length default to the target's, the vocabulary must match). Random weights are allowed
  for timing. It has its own cache; when all k proposals are accepted it has not yet seen dk, so its
  next first forward takes two tokens [dk, x].

With a parallel mode (CQIL), the target is built through the mode's layer spec on each of its processes,
every process runs the same draft (a second model is replicated; a self-speculative draft is the first N
layers of each process's decoder, for CQIL its layers in order, so past the first group its concurrent
form) and takes the same decisions from the same logits, as the plain decode step does.

A batch is verified in lockstep: the step accepts the smallest n over the batch (still exactly greedy:
past its own n a sequence's gn is the target's token too). ``accepted_rate_per_sequence`` in the record
says what lockstep costs against per-sequence acceptance.

FLOPs (``request_flops``) are counted from the forwards actually run: a forward of s new tokens at
positions start..start+s-1 costs ``F.layer_forward_flops(shape, b, s, attn_seq=start + s)`` per layer
it runs (every query against the whole valid context: the usual "causal masking not subtracted"
convention, as for the prefill) plus the LM head on the positions it is applied to (verify: all k + 1;
draft and prefill: the last one).

This module is torch-free (config, validation, FLOPs); ``engine.py`` holds the engine and
``workload.py`` the measured loop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from suite import errors
from suite.fields import doc
from suite.metrics import flops as F
from suite.registry import Trick, register
from suite.scenario.schema import ModelConfig

KEY = "tricks.speculative"
LAYERS = re.compile(r"^layers:(\d+)$")


@dataclass
class SpeculativeConfig:
    """[tricks.speculative]"""

    draft: str | ModelConfig = doc("The draft: 'layers:N' (self-speculative: the target's first N layers with its "
                                   "final norm and LM head, sharing its KV cache) or a second model as a table "
                                   "with [model]'s keys, e.g. { preset = \"tiny\", init = \"random\" } (vocab_size "
                                   "and max_sequence_length default to the target's).", "layers:1")
    k: int = doc("Tokens the draft proposes per verify step (the target verifies them in one forward).", 4,
                 range="[1, 64]")


def self_layers(cfg: SpeculativeConfig) -> int | None:
    """N of a 'layers:N' draft, None for a second model."""
    if isinstance(cfg.draft, str):
        m = LAYERS.match(cfg.draft.strip())
        return int(m.group(1)) if m else None
    return None


def draft_model(spec, cfg: SpeculativeConfig):
    """The second draft model's [model] section, filled (preset, the target's vocabulary and length)."""
    from suite.scenario.loader import fill_model

    d = cfg.draft
    d = replace(d, vocab_size=d.vocab_size or spec.model.vocab_size,
                max_sequence_length=d.max_sequence_length or spec.model.max_sequence_length)
    try:
        return fill_model(d, {"file": spec.file, "variant": spec.name})
    except errors.UserError as e:  # fill_model names [model]'s keys: name the draft's
        e.key = f"{KEY}.draft.{e.key.split('.', 1)[1]}" if e.key else e.key
        e.fix = e.fix and e.fix.replace("[model] ", "the draft's ")
        raise


def draft_shape(spec, cfg: SpeculativeConfig) -> tuple[F.Shape, int]:
    """(shape, layers it runs) of the draft."""
    n = self_layers(cfg)
    if n is not None:
        return F.Shape.of(spec.model), n
    shape = F.Shape.of(draft_model(spec, cfg))
    return shape, shape.layers


# --- FLOPs ---------------------------------------------------------------------------------------

def forward_flops(shape: F.Shape, layers: int, batch: int, new: int, start: int, head: int,
                  attention: bool = True) -> int:
    """One cached forward: ``new`` tokens at positions start.., ``layers`` layers, the LM head on ``head``
    positions; ``attention=False`` leaves out the score and value products (what a CPU FLOP counter sees)."""
    kv = start + new if attention else 0
    return layers * F.layer_forward_flops(shape, batch, new, attn_seq=kv) + F.head_forward_flops(shape, batch, head)


def request_flops(log: list[tuple], target: F.Shape, draft: tuple[F.Shape, int], attention: bool = True) -> dict:
    """FLOPs of one request from its forwards, each ``(role, batch, new, start, head)`` with role one of
    prefill, draft_prefill, draft, verify: {role: FLOPs} plus ``total``."""
    out = dict.fromkeys(("prefill", "draft_prefill", "draft", "verify"), 0)
    for role, batch, new, start, head in log:
        shape, layers = (target, target.layers) if role in ("prefill", "verify") else draft
        out[role] += forward_flops(shape, layers, batch, new, start, head, attention)
    out["total"] = sum(out.values())
    return out


def greedy_flops(target: F.Shape, batch: int, prompt: int, gen: int, attention: bool = True) -> int:
    """FLOPs of the plain greedy request the speculative one replaces: the prefill, then ``gen`` one-token
    decode steps (the inference workload's decode step)."""
    total = forward_flops(target, target.layers, batch, prompt, 0, 1, attention)
    return total + sum(forward_flops(target, target.layers, batch, 1, prompt + t, 1, attention) for t in range(gen))


def plan_row(spec, cfg: SpeculativeConfig) -> dict:
    """`suite plan`: the draft in the layout column, a second model's weights in the memory (every process
    holds one)."""
    if isinstance(cfg.draft, str):
        return {"layout": f" + draft {cfg.draft}"}
    shape, _ = draft_shape(spec, cfg)
    return {"layout": f" + draft {shape.layers}x{shape.hidden}",
            "memory": F.parameters(shape)["total"] * (2 if spec.workload.bf16 else 4)}


# --- validation ----------------------------------------------------------------------------------

def validate(spec, cfg: SpeculativeConfig) -> None:
    def fail(key, message, fix):
        errors.fail(spec, key, message, fix)

    w, p, m = spec.workload, spec.parallel, spec.model
    if w.kind != "inference":
        fail("workload.kind", f"speculative decoding is an inference technique; workload.kind is '{w.kind}'.",
             'set kind = "inference" or remove [tricks.speculative].')
    if p.tp != 1 or p.pp != 1:
        fail("parallel.tp" if p.tp != 1 else "parallel.pp", "speculative decoding runs without tensor or pipeline "
             "parallelism (every process runs the draft and reads the target's logits; a parallel mode such as "
             "CQIL may lay the target over several GPUs).", "set tp = 1 and pp = 1.")
    if isinstance(cfg.draft, str):
        n = self_layers(cfg)
        if n is None:
            fail(f"{KEY}.draft", f"draft '{cfg.draft}' is neither 'layers:N' nor a model table.",
                 'write draft = "layers:2" or draft = { preset = "tiny" }.')
        if not 1 <= n < m.num_layers:
            fail(f"{KEY}.draft", f"a self-speculative draft of {n} layers must be shorter than the model's "
                 f"{m.num_layers} layers and at least 1.", f"use layers:N with N between 1 and {m.num_layers - 1}.")
        drafts = [m]
    else:
        d = draft_model(spec, cfg)
        if d.vocab_size != m.vocab_size:
            fail(f"{KEY}.draft.vocab_size", f"the draft's vocabulary ({d.vocab_size}) differs from the target's "
                 f"({m.vocab_size}); proposals are token ids of one vocabulary.",
                 f"remove vocab_size from the draft (it defaults to {m.vocab_size}).")
        if d.num_query_groups and d.num_attention_heads % d.num_query_groups:
            fail(f"{KEY}.draft.num_query_groups", f"the draft's {d.num_attention_heads} heads are not divisible "
                 f"by its {d.num_query_groups} query groups.", "choose query groups that divide the heads.")
        if d.hidden_size % d.num_attention_heads:
            fail(f"{KEY}.draft.hidden_size", f"the draft's hidden size {d.hidden_size} is not divisible by its "
                 f"{d.num_attention_heads} heads.", "choose a hidden size that the heads divide.")
        drafts = [m, d]
    longest = max(w.prompt_lengths) + max(w.gen_lengths) + cfg.k
    for model, where in zip(drafts, ("model", f"{KEY}.draft")):
        if longest > model.max_sequence_length:
            fail(f"{where}.max_sequence_length", f"prompt {max(w.prompt_lengths)} + generated {max(w.gen_lengths)} "
                 f"+ k {cfg.k} positions (a verify step may look k past the last token) exceed max_sequence_length "
                 f"{model.max_sequence_length}.",
                 f"shorten the grid, lower k or raise max_sequence_length to {longest}.")


register(Trick(name="speculative", config=SpeculativeConfig, validate=validate,
               workload="suite.tricks.speculative.workload", kinds=("inference",), with_modes=True,
               plan_row=plan_row))
