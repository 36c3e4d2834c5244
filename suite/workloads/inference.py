"""Inference workload: time to first token and per-token decode latency with a KV cache.

For every point of the grid ``batch_sizes × prompt_lengths × gen_lengths`` (× eager / CUDA graph, per
``workload.cuda_graph``) one *request* is: prefill of a synthetic prompt (random tokens, seeded),
which yields the first greedy token, then ``gen`` decode steps, each feeding back the greedy token.
``warmup_repeats`` requests run untimed, then ``repeats`` timed ones: the prefill as one interval and
every decode step as its own. CUDA events on GPU, host clock on CPU, read on rank 0: every step ends
with collectives that include rank 0 (TP and CQIL all-reduces, or the PP broadcast of the token),
so rank 0's clock spans the step.

KV cache: our own, in the core attention (``CachedAttention``, swapped in through the layer spec),
rather than megatron's ``StaticInferenceContext``. Megatron's static cache returns a key tensor that
grows every step and re-applies RoPE to every cached key, so each decode step has new shapes and
cannot be captured in a CUDA graph (megatron's graphable path needs flash-attn's kvcache kernel,
which the GPU image lacks). Ours has fixed shapes: per layer K/V buffers [b, groups, prompt + gen,
d] holding keys with RoPE applied, the step's position as a device tensor and a boolean mask over the
buffer. Prefill writes the prompt's K/V and attends causally within the prompt; a decode step writes
one position and attends over the buffer with later positions masked. Every layer keeps its own
cache, in CQIL groups too (each layer computes its own K/V from the group's shared input).

The model runs as megatron's embedding → decoder → output layer called in turn (GPTModel.forward
derives RoPE positions from the input length, and decode needs position p); ``tests/test_inference.py``
checks decode logits against GPTModel.forward over the whole sequence. The LM head runs on the last
position only. Prefill is eager; ``cuda_graph`` applies to the decode step, captured whole per
pipeline stage (embedding, layers with their TP/CQIL collectives, head, argmax, position update).

Record: ``metrics.inference`` is a list with one flat entry per (batch, prompt, gen, cuda_graph):

    batch, prompt, gen          sequences per request, prompt tokens each, generated tokens each
    cuda_graph                  true: the decode steps replayed a CUDA graph (prefill is always eager)
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
                                t), averaged over the steps; layers CQIL replicates count once (useful bytes)
    decode_bandwidth_tb_s       decode_bytes_per_step / median decode step / 1e12
    decode_bandwidth_fraction   decode_bandwidth_tb_s / (world size × measured copy bandwidth); null on CPU
    repeats_same_tokens         every request of the point (warm-up included) produced the same greedy
                                tokens: false means nondeterministic kernels, which makes a graph-vs-eager
                                difference uninformative
    same_tokens_as_eager        graph entries: the greedy tokens of the last request equal the eager entry's
                                (null otherwise). Seen false for bf16 LLaMA-7B with random weights (true in
                                fp32): near-tied logits flip when captured kernels round differently
    graph_logits_rel_diff       graph entries: max |logits_graph − logits_eager| / max |logits_eager| at the
                                first decode step (same prefill, same input): rounding-sized (~1e-7 in fp32,
                                around bf16's 2^-8 in bf16) unless the graph is wrong. Null without logits on
                                rank 0 (PP: the last stage holds them)

Beside it: parameters, world_size, peak_memory_bytes, memory_kind, gemm_ceiling_tflops,
copy_bandwidth_tb_s, datasheet_peak_tflops, cuda_graph_unavailable (asked for, no GPU), cqil
(``CQILPlan.describe()``: degree, groups, bypass, depth, layers_per_gpu; null without CQIL), extra.
The record's ``measures`` hold the raw samples per point: ``ttft`` (ms, one per timed request) and
``decode_latency`` (ms/token, one per timed decode step) (``suite.workloads.measures``); under CQIL its
``layout`` holds ``cqil_degree`` (and dp = 1).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as Fn
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from suite.metrics import flops as F
from suite.metrics import hardware
from suite.metrics.collect import peak_memory, reduce_scalar
from suite.metrics.stats import summarize
from suite.workloads.measures import inference_measures
from suite.models import gpt
from suite.models.build import build
from suite.models.attention import SDPAttention
from suite.parallel import cqil, cqil_layer
from suite.workloads.train import StepClock


@dataclass
class DecodeState:
    """Shared by every layer's cache: what the current forward is and where it writes."""

    mode: str = "off"  # "off": plain attention, no cache; "prefill"; "decode"
    pos: torch.Tensor | None = None  # [1] int64: position of the token being decoded
    mask: torch.Tensor | None = None  # [1, 1, 1, capacity] bool: positions <= pos


class CachedAttention(SDPAttention):
    """SDPAttention plus this layer's K/V cache (``Engine.allocate`` sets the buffers)."""

    state: DecodeState | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        st = self.state
        if st is None or st.mode == "off":
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, groups, s, d]
        if st.mode == "prefill":  # the prompt attends causally to itself; keep its K/V
            self.k[:, :, :k.shape[2]] = k
            self.v[:, :, :v.shape[2]] = v
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        self.k.index_copy_(2, st.pos, k)
        self.v.index_copy_(2, st.pos, v)
        q = query.permute(1, 2, 0, 3)
        out = Fn.scaled_dot_product_attention(q, self.k, self.v, attn_mask=st.mask, scale=self.softmax_scale,
                                              enable_gqa=q.shape[1] != self.k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(1, q.shape[0], -1)


@contextlib.contextmanager
def _rng_fork_disabled():
    """Megatron forks its CUDA RNG tracker around dropout in some paths; forking reseeds, which
    graph capture forbids. Inference has no dropout, so the fork is a null context while capturing."""
    fork = mrandom.CudaRNGStatesTracker.fork
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    try:
        yield
    finally:
        mrandom.CudaRNGStatesTracker.fork = fork


class Engine:
    """This rank's model for generation (a pipeline stage, TP shard or CQIL rank), its caches and
    optionally its decode step captured in a CUDA graph.

    After ``allocate(b, capacity)``: ``prefill(prompt)`` then ``decode()`` steps; ``tokens`` [b, 1]
    holds the latest greedy tokens on every rank (the next step's input), ``logits`` [b, vocab]
    the logits that chose them (last pipeline stage).
    """

    def __init__(self, spec, log=print):
        self.spec = spec
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.plan = cqil.plan_of(spec)
        self.cqil_groups = []
        layer = gpt.layer_spec()
        layer.submodules.self_attention.submodules.core_attention = CachedAttention
        block = layer
        if self.plan:
            from suite.launch.guard import TIMEOUT_MARGIN_S  # megatron's groups get the same (spmd)

            group, cqil_rank, self.cqil_groups = cqil_layer.new_groups(
                spec.parallel.tp, self.plan.degree, timeout_s=spec.workload.timeout_s + TIMEOUT_MARGIN_S)
            block = cqil_layer.block_spec(layer, self.plan, cqil_rank, group)
        built = build(spec, block, log=log, inference=True)  # [model] init, CQIL ranks included
        self.model, self.config = built.model, built.config
        self.state = DecodeState()
        self.attention = [m for m in self.model.modules() if isinstance(m, CachedAttention)]
        for a in self.attention:
            a.state = self.state
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.rope = self.model.rotary_pos_emb(spec.model.max_sequence_length)  # [positions, 1, 1, d]
        self.graph = None

    # --- buffers ---------------------------------------------------------------------------------

    def allocate(self, batch: int, capacity: int) -> None:
        """Zeroed K/V caches for ``batch`` sequences of up to ``capacity`` tokens, and the step's buffers."""
        self.release()
        c, dev, dtype = self.config, self.device, self.config.params_dtype
        groups = c.num_query_groups // ps.get_tensor_model_parallel_world_size()
        for a in self.attention:
            a.k = torch.zeros(batch, groups, capacity, c.kv_channels, dtype=dtype, device=dev)
            a.v = torch.zeros_like(a.k)
        self.state.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.state.mask = torch.zeros(1, 1, 1, capacity, dtype=torch.bool, device=dev)
        self.positions = torch.arange(capacity, device=dev).view(1, 1, 1, capacity)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(batch, self.spec.model.vocab_size, dtype=dtype, device=dev)
        self.hidden_in = torch.zeros(1, batch, c.hidden_size, dtype=dtype, device=dev)
        self.hidden_out = torch.zeros_like(self.hidden_in)

    def release(self) -> None:
        self.graph = None
        for a in self.attention:
            a.k = a.v = None
        self.state.mode = "off"
        if self.cuda:
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Frees the caches and this variant's CQIL process groups."""
        self.release()
        for g in self.cqil_groups:
            dist.destroy_process_group(g)
        self.cqil_groups = []

    # --- forward ---------------------------------------------------------------------------------

    def _stage(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """This stage's forward: tokens [b, s] or hidden [s, b, h] in; hidden, or the last position's
        full-vocabulary logits [b, vocab] on the last stage, out."""
        m = self.model
        if self.first:
            hidden = m.embedding(input_ids=x, position_ids=None)
        else:
            m.decoder.set_input_tensor(x)  # megatron's decoder reads a non-first stage's input from here
            hidden = x
        hidden = m.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        if not self.last:
            return hidden
        logits, _ = m.output_layer(hidden[-1:])
        return gather_from_tensor_model_parallel_region(logits)[0, :, :self.spec.model.vocab_size]

    def _finish(self, out: torch.Tensor) -> None:
        """Last stage: logits and greedy tokens into the step's buffers; other stages: hidden."""
        if self.last:
            self.logits.copy_(out)
            self.tokens.copy_(out.argmax(dim=-1, keepdim=True))
        else:
            self.hidden_out.copy_(out)

    def _share_tokens(self) -> None:
        if self.pp > 1:  # the first stage needs the token for the next step
            dist.broadcast(self.tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Runs the prompt [b, p], fills the caches and leaves the first greedy tokens in ``tokens``."""
        b, p = prompt.shape
        self.state.mode = "prefill"
        x = prompt
        if not self.first:
            x = torch.empty(p, b, self.config.hidden_size, dtype=self.config.params_dtype, device=self.device)
            dist.recv(x, ps.get_pipeline_model_parallel_prev_rank())
        out = self._stage(x, self.rope[:p])
        if self.last:
            self._finish(out)
        else:
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
        self._share_tokens()
        self.state.pos.fill_(p)
        self.state.mode = "decode"

    def _decode_compute(self) -> None:
        """One decode step of this stage on the static buffers (what a CUDA graph captures)."""
        torch.le(self.positions, self.state.pos, out=self.state.mask)
        out = self._stage(self.tokens if self.first else self.hidden_in, self.rope.index_select(0, self.state.pos))
        self._finish(out)
        self.state.pos.add_(1)

    @torch.no_grad()
    def decode(self) -> None:
        """Feeds ``tokens`` at the current position; the next greedy tokens replace them."""
        if not self.first:
            dist.recv(self.hidden_in, ps.get_pipeline_model_parallel_prev_rank())
        if self.graph is not None:
            self.graph.replay()
        else:
            self._decode_compute()
        if not self.last:
            dist.send(self.hidden_out, ps.get_pipeline_model_parallel_next_rank())
        self._share_tokens()

    @torch.no_grad()
    def capture(self) -> None:
        """Captures ``_decode_compute`` in a CUDA graph (call after a prefill; the state is restored)."""
        saved = self.tokens.clone(), self.state.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream (cuBLAS, allocator, NCCL), as capture needs
            for _ in range(2):
                self._decode_compute()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread may query events while this thread captures
        with _rng_fork_disabled(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._decode_compute()
        self.tokens.copy_(saved[0])
        self.state.pos.copy_(saved[1])


# --- measurement ---------------------------------------------------------------------------------

def grid(w, cuda: bool) -> list[tuple[int, int, int, bool]]:
    """(batch, prompt, gen, cuda_graph) points in run order; graph points need a GPU."""
    modes = {"off": [False], "on": [True], "both": [False, True]}[w.cuda_graph]
    if not cuda:
        modes = [False]
    return [(b, p, g, graph) for b, p, g in itertools.product(w.batch_sizes, w.prompt_lengths, w.gen_lengths)
            for graph in (modes if g > 0 else [False])]


def synthetic_prompt(spec, batch: int, prompt: int) -> torch.Tensor:
    """The same random tokens on every rank and at every layout (seeded by the point)."""
    gen = torch.Generator().manual_seed(spec.workload.seed * 1_000_003 + batch * 65_537 + prompt)
    return torch.randint(0, spec.model.vocab_size, (batch, prompt), generator=gen)


def measure_point(engine: Engine, spec, batch: int, prompt: int, gen: int, graph: bool) -> dict:
    """Raw timings of one grid point: per timed request its prefill, decode steps and total."""
    w = spec.workload
    engine.allocate(batch, prompt + gen)
    tokens = synthetic_prompt(spec, batch, prompt).to(engine.device)
    if graph:
        engine.prefill(tokens)
        engine.capture()
    prefill_s, decode_s, request_s, first_tokens, repeats_same = [], [], [], None, True
    for r in range(w.warmup_repeats + w.repeats):
        clock = StepClock(engine.cuda)
        out, first_logits = [], None
        clock.start()
        engine.prefill(tokens)
        clock.stop()
        out.append(engine.tokens.clone())
        for step in range(gen):
            clock.start()
            engine.decode()
            clock.stop()
            out.append(engine.tokens.clone())
            if step == 0 and engine.last:  # the graph check compares these (same prefill, same input)
                first_logits = engine.logits.float().clone()
        tokens_now = torch.cat(out, dim=1)
        if first_tokens is None:
            first_tokens = tokens_now
        repeats_same = repeats_same and torch.equal(tokens_now, first_tokens)
        if r >= w.warmup_repeats:
            times = clock.seconds()
            prefill_s.append(times[0])
            decode_s += times[1:]
            request_s.append(sum(times))
    engine.release()
    return {"batch": batch, "prompt": prompt, "gen": gen, "cuda_graph": graph, "prefill_s": prefill_s,
            "decode_s": decode_s, "request_s": request_s, "tokens": tokens_now.tolist(),
            "repeats_same_tokens": repeats_same,
            "first_logits": None if first_logits is None else first_logits.cpu()}


def run(spec, ctx, fault=lambda step: None) -> dict:
    """Measure the latency grid on this rank; returns raw timings (rank 0's are recorded)."""
    engine = Engine(spec, ctx.log)
    try:
        if engine.cuda:
            torch.cuda.reset_peak_memory_stats()
        points = []
        for i, (b, p, g, graph) in enumerate(grid(spec.workload, engine.cuda)):
            fault(i)
            pt = measure_point(engine, spec, b, p, g, graph)
            points.append(pt)
            decode = summarize(pt["decode_s"])
            ctx.log(f"batch {b} prompt {p} gen {g} {'graph' if graph else 'eager'}: first token "
                    f"{summarize(pt['prefill_s'])['median'] * 1e3:.2f} ms"
                    + (f", decode {decode['median'] * 1e3:.3f} ms/token" if decode else ""))
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
        "batch": b, "prompt": p, "gen": g, "cuda_graph": pt["cuda_graph"], "repeats": len(pt["prefill_s"]),
        **{f"prefill_ms_{k}": _ms(pre, k) for k in ("median", "p10", "p90", "p99")},
        "prefill_tokens_per_s": b * p / pre["median"], "prefill_flops": flops,
        "prefill_tflops_per_gpu": tflops, "prefill_mfu": tflops / peak_tflops if peak_tflops else None,
        **{f"decode_ms_{k}": _ms(dec, k) for k in ("median", "p10", "p90", "p99")},
        "decode_steps": len(pt["decode_s"]), "decode_tokens_per_s": b / dec["median"] if dec else None,
        "request_ms_median": _ms(req, "median"),
        "decode_bytes_per_step": nbytes, "decode_bandwidth_tb_s": bandwidth,
        "decode_bandwidth_fraction": bandwidth / (world * copy_tb_s) if bandwidth and copy_tb_s else None,
        "repeats_same_tokens": pt["repeats_same_tokens"], "same_tokens_as_eager": None,
        "graph_logits_rel_diff": None,
    }


def metrics(raw: dict, spec, ctx) -> dict:
    """The record's metrics (module docstring); collective: every rank calls it."""
    cuda = torch.cuda.is_available()
    peak, kind = peak_memory()
    peak = reduce_scalar(peak, dist.ReduceOp.MAX, ctx)
    peak_tflops = hardware.datasheet_peak_tflops(torch.cuda.get_device_name() if cuda else None)
    ceilings = hardware.measured_ceilings() if cuda else {}
    shape = F.Shape.of(spec.model)
    elem = 2 if spec.workload.precision == "bf16" else 4
    entries, eager = [], {}
    for pt in raw["points"]:
        entry = point_entry(pt, shape, elem, ctx.world, peak_tflops, ceilings.get("copy_tb_s"))
        key = (pt["batch"], pt["prompt"], pt["gen"])
        if not pt["cuda_graph"]:
            eager[key] = pt
        elif key in eager:
            entry["same_tokens_as_eager"] = pt["tokens"] == eager[key]["tokens"]
            a, b = pt["first_logits"], eager[key]["first_logits"]
            if a is not None and b is not None:
                entry["graph_logits_rel_diff"] = float((a - b).abs().max() / b.abs().max())
        entries.append(entry)
    plan = cqil.plan_of(spec)
    samples = {(pt["batch"], pt["prompt"], pt["gen"], pt["cuda_graph"]):
               {"ttft": [t * 1e3 for t in pt["prefill_s"]], "decode": [t * 1e3 for t in pt["decode_s"]]}
               for pt in raw["points"]}
    out = {
        "parameters": F.parameters(shape)["total"], "world_size": ctx.world,
        "peak_memory_bytes": int(peak), "memory_kind": kind,
        "gemm_ceiling_tflops": ceilings.get("gemm_tflops"), "copy_bandwidth_tb_s": ceilings.get("copy_tb_s"),
        "datasheet_peak_tflops": peak_tflops, "cuda_graph_unavailable": raw["cuda_graph_unavailable"],
        "cqil": plan.describe() if plan else None, "inference": entries, "extra": {},
        "layout": plan.layout() if plan else {},
    }
    out["measures"] = inference_measures(out, samples)
    return out
