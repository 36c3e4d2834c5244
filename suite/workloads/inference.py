"""Inference workload: time to first token and per-token decode latency with a KV cache.

For every point of the grid ``batch_sizes × prompt_lengths × gen_lengths`` (× eager / CUDA graph, per
``workload.cuda_graph``; the decode step compiled or not, per ``model.kernels``) one *request* is:
prefill of a synthetic prompt (random tokens, seeded), which yields the first greedy token, then ``gen``
decode steps, each feeding back the greedy token. A compiled step is compiled before the first request
(its time recorded apart). ``warmup_repeats`` requests run untimed, then ``repeats`` timed ones: the
prefill as one interval and every decode step as its own. CUDA events on GPU, host clock on CPU, read on
rank 0: every step ends with collectives that include rank 0 (TP all-reduces and a parallel mode's, or
the PP broadcast of the token), so rank 0's clock spans the step.

The generation engine (this rank's model, its KV cache, prefill, decode step and CUDA-graph capture)
is ``suite.models.generate.Engine``; this module times it and turns the timings into metrics.

Record: ``metrics.inference`` is a list with one flat entry per (batch, prompt, gen, cuda_graph):

    batch, prompt, gen          sequences per request, prompt tokens each, generated tokens each
    cuda_graph                  true: the decode steps replayed a CUDA graph (prefill is always eager)
    compiled                    the decode step ran under torch.compile (``[model] kernels = "compile"``, gen > 0)
    decode_compile_s            compiled entries: seconds of the first compiled call (compilation and autotuning,
                                before any timed request); null when not compiled
    repeats                     timed requests
    prefill_ms_median, prefill_ms_p10, prefill_ms_p90, prefill_ms_p99
                                time to first token: prefill + the first greedy token
    prefill_tokens_per_s        batch · prompt / median prefill time
    prefill_flops               model FLOPs of the prefill (suite.metrics.flops; LM head on the last position)
    prefill_tflops_per_gpu      prefill_flops / median prefill time / world size / 1e12
    prefill_mfu                 prefill_tflops_per_gpu / datasheet dense bf16 peak (null: CPU, unknown GPU)
    decode_ms_median, decode_ms_p10, decode_ms_p90, decode_ms_p99
                                one decode step (one new token per sequence), over all steps of all timed
                                requests (null when gen = 0)
    decode_steps                timed decode steps (gen · repeats)
    decode_tokens_per_s         batch / median decode step
    request_ms_median           median over timed requests of prefill + all decode steps
    decode_bytes_per_step       bytes a step must read: every weight once (layers, final norm, LM head, the
                                batch's embedding rows) + K/V of the valid context (prompt + t + 1 at step
                                t), averaged over the steps; layers a parallel mode replicates count once (useful bytes)
    decode_bandwidth_tb_s       decode_bytes_per_step / median decode step / 1e12
    decode_bandwidth_fraction   decode_bandwidth_tb_s / (world size × measured copy bandwidth); null on CPU
    repeats_same_tokens         every request of the point (warm-up included) produced the same greedy
                                tokens: false means the requests are not bitwise repeatable (seen on GPUs,
                                with and without graphs), which makes a token-level graph-vs-eager
                                comparison uninformative
    repeats_differ_from         the first generated position at which a request's tokens differ from the first
                                request's (0: the prefill's token); null when all agree
    distinct_4grams             distinct 4-grams / 4-grams of the last request's generated tokens, averaged over
                                its sequences (``distinct_ngrams``): near 0 for a greedy loop
    same_tokens_as_eager        graph and compiled entries: the greedy tokens of the last request equal the
                                eager reference's (null otherwise): a compiled entry's reference is one untimed
                                request of the same point with the plain eager step; an uncompiled graph
                                entry's is the eager entry of its point (cuda_graph = "both"). Seen false for
                                bf16 LLaMA-7B with random weights (true in fp32): near-tied logits flip when
                                captured kernels round differently
    tokens_differ_from          the same entries: the first generated position whose greedy token differs from
                                the reference's (0: the prefill's token); null when all agree
    graph_logits_rel_diff       graph and compiled entries: max |logits − logits_eager| / max |logits_eager| of
                                one decode step run both ways from one prefill's state with the same input
                                token (``step_check``, after the timed requests): rounding-sized (~1e-7 in
                                fp32, around bf16's 2^-8 in bf16) unless the graph or the compiled step is
                                wrong, whatever near-ties do to the tokens. Null without logits on rank 0 (PP:
                                the last stage holds them)
    graph_noise_rel_diff        the yardstick beside it: the same measure for the eager step with every layer's
                                output moved by one ulp of its dtype (random signs, ``Engine.layer_noise``), from
                                the same state: what rounding alone does at this depth and width. A
                                graph_logits_rel_diff of that order is rounding; one far above it is not

Beside it: parameters, world_size, peak_memory_bytes, memory_kind, gemm_ceiling_tflops,
copy_bandwidth_tb_s, datasheet_peak_tflops, cuda_graph_unavailable (asked for, no GPU), prompt_source
('text': prompts are windows of the corpus's held-out tail, ``prompt_tokens``; 'synthetic'), one block per
registered parallel mode under its name (``ParallelMode.describe``; null when the variant does not use it), extra.
The record's ``measures`` hold the raw samples per point: ``ttft`` (ms, one per timed request) and
``decode_latency`` (ms/token, one per timed decode step) (``suite.workloads.measures``); a parallel mode adds
its keys to ``layout`` (``ParallelMode.layout``).
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import torch.distributed as dist

from suite import registry
from suite.errors import fail
from suite.metrics import flops as F
from suite.metrics import hardware
from suite.metrics.collect import peak_memory, reduce_scalar
from suite.metrics.stats import summarize
from suite.models.generate import Engine
from suite.workloads.measures import inference_measures
from suite.workloads.train import StepClock


# --- measurement ---------------------------------------------------------------------------------

def grid(w, cuda: bool) -> list[tuple[int, int, int, bool]]:
    """(batch, prompt, gen, cuda_graph) points in run order; graph points need a GPU."""
    modes = {"off": [False], "on": [True], "both": [False, True]}[w.cuda_graph]
    if not cuda:
        modes = [False]
    return [(b, p, g, graph) for b, p, g in itertools.product(w.batch_sizes, w.prompt_lengths, w.gen_lengths)
            for graph in (modes if g > 0 else [False])]


def prompt_source(spec) -> str:
    """'text' (prompts from the corpus's held-out tail) or 'synthetic' (random tokens)."""
    from suite.eval.metrics import TEXT_SOURCES

    return "text" if spec.data.source in TEXT_SOURCES else "synthetic"


def prompt_tokens(spec, batch: int, prompt: int) -> torch.Tensor:
    """The point's prompts [batch, prompt], the same on every rank and at every layout. With a text corpus
    (``[data] source``), windows of the held-out tail (the text validation reads, never trained on),
    evenly spaced over it: what a trained model meets, which speculative decoding's acceptance depends on.
    Otherwise random tokens, seeded by the point (enough for timing)."""
    from suite.eval.metrics import heldout_tokens

    if prompt_source(spec) == "text":
        tail = heldout_tokens(spec)
        if len(tail) < prompt:
            fail(spec, "workload.prompt_lengths", f"a prompt of {prompt:,} tokens is longer than the corpus's "
                 f"held-out tail ({len(tail):,} tokens).", "use shorter prompts, a larger corpus or a larger "
                 "data.valid_fraction.")
        stride = max(1, (len(tail) - prompt) // max(1, batch))
        starts = [min(i * stride, len(tail) - prompt) for i in range(batch)]
        return torch.stack([tail[s:s + prompt] for s in starts]).long()
    gen = torch.Generator().manual_seed(spec.workload.seed * 1_000_003 + batch * 65_537 + prompt)
    return torch.randint(0, spec.model.vocab_size, (batch, prompt), generator=gen)


def request(engine: Engine, prompt: torch.Tensor, gen: int, clock: StepClock) -> torch.Tensor:
    """One request: prefill, then ``gen`` decode steps, each an interval of ``clock``. Returns the greedy
    tokens [b, 1 + gen]."""
    out = []
    clock.start()
    engine.prefill(prompt)
    clock.stop()
    out.append(engine.tokens.clone())
    for _ in range(gen):
        clock.start()
        engine.decode()
        clock.stop()
        out.append(engine.tokens.clone())
    return torch.cat(out, dim=1)


def _eager_step(engine: Engine, noise: bool = False) -> torch.Tensor | None:
    """The plain eager decode step from the engine's state, which it leaves as it was: a copy of its logits
    (None off the last pipeline stage); with ``noise``, under ``Engine.layer_noise``."""
    timed = engine.graph, engine.compiled_step
    with engine.state_restored():
        engine.graph = engine.compiled_step = None
        try:
            noisy = engine.layer_noise() if noise else contextlib.nullcontext()
            with torch.compiler.set_stance("force_eager"), noisy:
                engine.decode()
        finally:
            engine.graph, engine.compiled_step = timed
    return engine.logits.float().clone() if engine.last else None


def step_check(engine: Engine, prompt: torch.Tensor) -> tuple[float | None, float | None]:
    """The decode step as timed (replayed from the CUDA graph and/or compiled) against the plain eager step,
    both from one prefill's state with the same input token, and the yardstick to read it by: the eager step
    with one ulp of noise on every layer's output. Each as max |logits difference| / max |eager logit| (last
    pipeline stage; None elsewhere). Comparing whole requests instead would compare different inputs as soon
    as a near-tie flips one greedy token, which random weights make common."""
    engine.prefill(prompt)
    eager = _eager_step(engine)
    noisy = _eager_step(engine, noise=True)
    engine.decode()
    if eager is None:
        return None, None
    scale = eager.abs().max()
    return (float((engine.logits.float() - eager).abs().max() / scale),
            float((noisy - eager).abs().max() / scale))


def measure_point(engine: Engine, spec, batch: int, prompt: int, gen: int, graph: bool) -> dict:
    """Raw timings of one grid point: per timed request its prefill, decode steps and total. A compiled
    decode step (``[model] kernels = "compile"``) is first run by one untimed plain eager request, the
    reference for its check, then compiled (timed on its own) before any timed or warm-up request."""
    w = spec.workload
    engine.allocate(batch, prompt + gen)
    tokens = prompt_tokens(spec, batch, prompt).to(engine.device)
    compiled = engine.compiled and gen > 0
    reference, compile_s = None, None
    if compiled:
        with torch.compiler.set_stance("force_eager"):  # plain eager, also for anything else compiled
            reference = {"tokens": request(engine, tokens, gen, StepClock(engine.cuda)).tolist()}
        engine.prefill(tokens)
        compile_s = engine.compile()
    if graph:
        engine.prefill(tokens)
        engine.capture()
    prefill_s, decode_s, request_s, first_tokens, repeats_differ_from = [], [], [], None, None
    for r in range(w.warmup_repeats + w.repeats):
        clock = StepClock(engine.cuda)
        tokens_now = request(engine, tokens, gen, clock)
        if first_tokens is None:
            first_tokens = tokens_now
        differ = first_difference(tokens_now.tolist(), first_tokens.tolist())
        if differ is not None:
            repeats_differ_from = differ if repeats_differ_from is None else min(repeats_differ_from, differ)
        if r >= w.warmup_repeats:
            times = clock.seconds()
            prefill_s.append(times[0])
            decode_s += times[1:]
            request_s.append(sum(times))
    step_rel_diff, noise_rel_diff = step_check(engine, tokens) if (graph or compiled) and gen > 0 else (None, None)
    engine.release()
    return {"batch": batch, "prompt": prompt, "gen": gen, "cuda_graph": graph, "compiled": compiled,
            "compile_s": compile_s, "reference": reference, "prefill_s": prefill_s,
            "decode_s": decode_s, "request_s": request_s, "tokens": tokens_now.tolist(),
            "repeats_same_tokens": repeats_differ_from is None, "repeats_differ_from": repeats_differ_from,
            "step_rel_diff": step_rel_diff, "noise_rel_diff": noise_rel_diff}


def run(spec, ctx, fault=lambda step: None) -> dict:
    """Measure the latency grid on this rank; returns raw timings (rank 0's are recorded)."""
    engine = Engine(spec, ctx.log, group_timeout_s=ctx.group_timeout_s)  # megatron's groups get the same
    try:
        if engine.cuda:
            torch.cuda.reset_peak_memory_stats()
        points = []
        for i, (b, p, g, graph) in enumerate(grid(spec.workload, engine.cuda)):
            fault(i)
            pt = measure_point(engine, spec, b, p, g, graph)
            points.append(pt)
            decode = summarize(pt["decode_s"])
            compiled = f", compiled in {pt['compile_s']:.1f} s" if pt["compiled"] else ""
            ctx.log(f"batch {b} prompt {p} gen {g} {'graph' if graph else 'eager'}: first token "
                    f"{summarize(pt['prefill_s'])['median'] * 1e3:.2f} ms"
                    + (f", decode {decode['median'] * 1e3:.3f} ms/token" if decode else "") + compiled)
        return {"points": points, "cuda_graph_unavailable": not engine.cuda and spec.workload.cuda_graph != "off"}
    finally:
        engine.close()


# --- metrics -------------------------------------------------------------------------------------

def decode_bytes_per_step(shape: F.Shape, batch: int, prompt: int, gen: int, elem: int) -> float:
    """Weights read once per step plus the valid K/V context, averaged over the ``gen`` steps."""
    weights = shape.layers * F.layer_params(shape) + shape.hidden + shape.vocab * shape.hidden + batch * shape.hidden
    kv_per_token = shape.layers * shape.kv_dim * elem  # K and V of every layer
    return weights * elem + batch * (prompt + (gen + 1) / 2) * kv_per_token


def prefill_flops(shape: F.Shape, batch: int, prompt: int) -> int:
    return shape.layers * F.layer_forward_flops(shape, batch, prompt) + F.head_forward_flops(shape, batch, 1)


def _ms(summary: dict | None, key: str) -> float | None:
    return None if summary is None else summary[key] * 1e3


def point_entry(pt: dict, shape: F.Shape, elem: int, world: int, peak_tflops, copy_tb_s) -> dict:
    b, p, g = pt["batch"], pt["prompt"], pt["gen"]
    pre, dec, req = summarize(pt["prefill_s"]), summarize(pt["decode_s"]), summarize(pt["request_s"])
    flops = prefill_flops(shape, b, p)
    tflops = flops / pre["median"] / world / 1e12
    nbytes = decode_bytes_per_step(shape, b, p, g, elem) if g else None
    bandwidth = nbytes / dec["median"] / 1e12 if dec else None
    return {
        "batch": b, "prompt": p, "gen": g, "cuda_graph": pt["cuda_graph"],
        "compiled": pt.get("compiled", False), "decode_compile_s": pt.get("compile_s"),  # absent: speculative's
        "repeats": len(pt["prefill_s"]),
        **{f"prefill_ms_{k}": _ms(pre, k) for k in ("median", "p10", "p90", "p99")},
        "prefill_tokens_per_s": b * p / pre["median"], "prefill_flops": flops,
        "prefill_tflops_per_gpu": tflops, "prefill_mfu": tflops / peak_tflops if peak_tflops else None,
        **{f"decode_ms_{k}": _ms(dec, k) for k in ("median", "p10", "p90", "p99")},
        "decode_steps": len(pt["decode_s"]), "decode_tokens_per_s": b / dec["median"] if dec else None,
        "request_ms_median": _ms(req, "median"),
        "decode_bytes_per_step": nbytes, "decode_bandwidth_tb_s": bandwidth,
        "decode_bandwidth_fraction": bandwidth / (world * copy_tb_s) if bandwidth and copy_tb_s else None,
        "repeats_same_tokens": pt["repeats_same_tokens"], "repeats_differ_from": pt.get("repeats_differ_from"),
        "distinct_4grams": distinct_ngrams(pt["tokens"]),
        "same_tokens_as_eager": None, "tokens_differ_from": None,
        "graph_logits_rel_diff": None, "graph_noise_rel_diff": None,
    }


def distinct_ngrams(tokens: list[list[int]], n: int = 4) -> float | None:
    """Distinct n-grams over all n-grams of the generated tokens, per sequence, averaged ("distinct-n", Li et
    al. 2016): near 1 for varied text, near 0 for a greedy loop repeating itself, where a draft that has
    learned the loop agrees at every step. None when no sequence holds n tokens."""
    fractions = [len(set(grams)) / len(grams) for seq in tokens
                 if (grams := [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)])]
    return sum(fractions) / len(fractions) if fractions else None


def first_difference(tokens: list[list[int]], reference: list[list[int]]) -> int | None:
    """The first generated position at which any sequence's greedy token differs from the reference's
    (0: already the prefill's token); None where all agree."""
    firsts = [next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
              for mine, theirs in zip(tokens, reference)]
    return min((i for i in firsts if i is not None), default=None)


def metrics(raw: dict, spec, ctx) -> dict:
    """The record's metrics (module docstring); collective: every rank calls it."""
    cuda = torch.cuda.is_available()
    peak, kind = peak_memory()
    peak = reduce_scalar(peak, dist.ReduceOp.MAX, ctx)
    peak_tflops = hardware.datasheet_peak_tflops(torch.cuda.get_device_name() if cuda else None)
    ceilings = hardware.measured_ceilings() if cuda else {}
    shape = F.Shape.of(spec.model)
    elem = 2 if spec.workload.bf16 else 4
    entries, eager = [], {}
    for pt in raw["points"]:
        entry = point_entry(pt, shape, elem, ctx.world, peak_tflops, ceilings.get("copy_tb_s"))
        key = (pt["batch"], pt["prompt"], pt["gen"])
        if not pt["cuda_graph"]:
            eager[key] = pt
        ref = pt.get("reference") or (eager.get(key) if pt["cuda_graph"] else None)
        if ref is not None:  # compiled: its own plain eager request; graph: the eager entry of the point
            entry["tokens_differ_from"] = first_difference(pt["tokens"], ref["tokens"])
            entry["same_tokens_as_eager"] = entry["tokens_differ_from"] is None
        if pt.get("step_rel_diff") is not None:
            entry["graph_logits_rel_diff"] = pt["step_rel_diff"]
            entry["graph_noise_rel_diff"] = pt["noise_rel_diff"]
        entries.append(entry)
    samples = {(pt["batch"], pt["prompt"], pt["gen"], pt["cuda_graph"]):
               {"ttft": [t * 1e3 for t in pt["prefill_s"]], "decode": [t * 1e3 for t in pt["decode_s"]]}
               for pt in raw["points"]}
    out = {
        "parameters": F.parameters(shape)["total"], "world_size": ctx.world,
        "peak_memory_bytes": int(peak), "memory_kind": kind,
        "gemm_ceiling_tflops": ceilings.get("gemm_tflops"), "copy_bandwidth_tb_s": ceilings.get("copy_tb_s"),
        "datasheet_peak_tflops": peak_tflops, "cuda_graph_unavailable": raw["cuda_graph_unavailable"],
        "prompt_source": prompt_source(spec),
        **registry.mode_blocks(spec), "inference": entries, "extra": {},
        "layout": registry.mode_layout(spec),
    }
    out["measures"] = inference_measures(out, samples)
    return out
