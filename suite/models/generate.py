"""Generation with a KV cache on this rank's part of a megatron-core GPTModel: the engine the inference
workload times (``suite.workloads.inference``), next to the model code it drives.

KV cache: our own, in the core attention (``CachedAttention``, swapped in through the layer spec),
rather than megatron's ``StaticInferenceContext``. Megatron's static cache returns a key tensor that
grows every step and re-applies RoPE to every cached key, so each decode step has new shapes and
cannot be captured in a CUDA graph (megatron's graphable path needs flash-attn's kvcache kernel,
which the GPU image lacks). Ours has fixed shapes: per layer K/V buffers [b, groups, prompt + gen,
d] holding keys with RoPE applied, the step's position as a device tensor and a boolean mask over the
buffer. Prefill writes the prompt's K/V and attends causally within the prompt; a decode step writes
one position and attends over the buffer with later positions masked (a caller may set ``pos`` to
several positions and ``mask`` to one row per position to feed several tokens at once, as speculative
decoding's verify step does). Every layer keeps its own
cache, also where a parallel mode runs layers side by side (each computes its own K/V from its input).

The model runs as megatron's embedding → decoder → output layer called in turn (GPTModel.forward
derives RoPE positions from the input length, and decode needs position p); ``tests/test_inference.py``
checks decode logits against GPTModel.forward over the whole sequence. The LM head runs on the last
position only. Prefill is eager; ``cuda_graph`` applies to the decode step, captured whole per
pipeline stage (embedding, layers with their TP and parallel-mode collectives, head, argmax, position update).

Compiled decode (``[model] kernels = "compile"``): that same step, ``_decode_compute``, goes through
``torch.compile`` as one unit, so inductor fuses each layer's norms, RoPE, KV-cache write and residual adds
(and the add into the next layer's norm) into a few kernels between the GEMMs. Its shapes are static
(the buffers are fixed per ``allocate``; the position is a device tensor), so one graph serves every
step of a request: ``dynamic=False``, and ``allocate`` drops the previous size's graphs
(``torch.compiler.reset``) so that a long grid never reaches dynamo's recompile limit. On a GPU the mode
is ``max-autotune-no-cudagraphs``: the engine captures the compiled step in its own CUDA graph (or, with
``cuda_graph = "off"``, runs it as is). Megatron-core's per-call ``warnings.warn`` (RowParallelLinear
passes no TP group) would split the step into a graph per linear layer (20 graphs for 8 layers instead
of 1, torch 2.13 CPU); the step uses the kernel back-end's no-op substitute for it inside compiled
graphs (``suite.models.kernels``), so it compiles to one graph.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as Fn
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from suite import registry
from suite.models import gpt, kernels
from suite.models.attention import SDPAttention
from suite.models.build import build


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
        return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)  # [s, b, h]: one or more new tokens


def capture_graph(step) -> "torch.cuda.CUDAGraph":
    """``step`` (a function of static buffers) captured in a CUDA graph, after two warm-up calls on a side
    stream (cuBLAS, the allocator and NCCL set up there, as capture needs). Every call of ``step`` writes
    what a real call would: callers restore their state around it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the NCCL watchdog thread may query events while this thread captures
    with rng_fork_disabled(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph


@contextlib.contextmanager
def rng_fork_disabled():
    """Megatron forks its CUDA RNG tracker around dropout in some paths; forking reseeds, which
    graph capture forbids. Inference has no dropout, so the fork is a null context while capturing
    (scoped: restored on exit, also on an error)."""
    fork = mrandom.CudaRNGStatesTracker.fork
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    try:
        yield
    finally:
        mrandom.CudaRNGStatesTracker.fork = fork


class Engine:
    """This rank's model for generation (a pipeline stage, TP shard or a parallel mode's rank), its caches and
    optionally its decode step captured in a CUDA graph.

    After ``allocate(b, capacity)``: ``prefill(prompt)`` then ``decode()`` steps; ``tokens`` [b, 1]
    holds the latest greedy tokens on every rank (the next step's input), ``logits`` [b, vocab]
    the logits that chose them (last pipeline stage). After a prefill, ``compile()`` (``[model] kernels =
    "compile"``) and ``capture()`` make the following ``decode()`` steps compiled and/or graph replays.
    """

    def __init__(self, spec, log=print, group_timeout_s: float | None = None):
        self.spec = spec
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        # a parallel mode may make process groups (with this collective timeout) and hand in the block
        # this rank builds
        self.modes = registry.mode_runtimes(spec, timeout_s=group_timeout_s)
        block = gpt.layer_spec()
        block.submodules.self_attention.submodules.core_attention = CachedAttention
        for mode in self.modes:
            block = mode.layer_spec(block)
        # [model] init, a parallel mode's ranks included; prefill stays eager, the decode step is compiled
        # whole (compile()) rather than layer by layer
        built = build(spec, block, log=log, inference=True, compile_layers=False)
        self.model, self.config = built.model, built.config
        self.state = DecodeState()
        self.attention = [m for m in self.model.modules() if isinstance(m, CachedAttention)]
        for a in self.attention:
            a.state = self.state
        self.first, self.last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.rope = self.model.rotary_pos_emb(spec.model.max_sequence_length)  # [positions, 1, 1, d]
        self.graph = None
        self.compiled = spec.model.kernels == "compile"
        self.compiled_step = None  # compile(): the decode step under torch.compile, for the allocated shapes

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
        if self.compiled_step is not None:  # it was compiled for the released buffers' shapes
            self.compiled_step = None
            torch.compiler.reset()
        for a in self.attention:
            a.k = a.v = None
        self.state.mode = "off"
        if self.cuda:
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Frees the caches and what this variant's parallel modes made (process groups)."""
        self.release()
        for mode in self.modes:
            mode.close()
        self.modes = []

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

    @contextlib.contextmanager
    def state_restored(self):
        """Steps run inside leave the request where it was: its next input tokens and position are put back
        (the K/V they wrote at that position is rewritten by the next real step)."""
        saved = self.tokens.clone(), self.state.pos.clone()
        try:
            yield
        finally:
            self.tokens.copy_(saved[0])
            self.state.pos.copy_(saved[1])

    @contextlib.contextmanager
    def layer_noise(self, seed: int = 0, ulps: float = 1.0):
        """Inside, every decoder layer's output hidden state is moved by ``ulps`` ulps of its dtype,
        h (1 ± ulps eps) with random signs (seeded): at 1, about what one rounding per layer changes. The
        logits this moves are the yardstick for a difference between two implementations of the step: one
        of the same order is rounding (``suite.workloads.inference.step_check``). Eager forwards only."""
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def perturb(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            signs = torch.randint(0, 2, h.shape, generator=gen, device=h.device).to(h.dtype) * 2 - 1
            h = h + h * signs * (ulps * torch.finfo(h.dtype).eps)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles = [layer.register_forward_hook(perturb) for layer in self.model.decoder.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def step(self) -> None:
        """One decode step on the static buffers: compiled once ``compile()`` ran, else plain."""
        if self.compiled_step is not None:
            self.compiled_step()
        else:
            self._decode_compute()

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
            self.step()
        if not self.last:
            dist.send(self.hidden_out, ps.get_pipeline_model_parallel_next_rank())
        self._share_tokens()

    @torch.no_grad()
    def compile(self) -> float:
        """Compiles the decode step for the allocated buffers and runs it once, so that compilation (and,
        on a GPU, autotuning) happens here (call after a prefill; the state is restored). Returns the
        seconds that first call took (compilation included); 0 when ``[model] kernels`` is not "compile".
        In pipeline stages after the first the step reads ``hidden_in`` as it is (no receive)."""
        if not self.compiled:
            return 0.0
        if self.compiled_step is None:
            mode = "max-autotune-no-cudagraphs" if self.cuda else None  # the engine captures graphs itself
            kernels.no_warnings_in_graphs()  # megatron's per-call warning: no graph break
            self.compiled_step = torch.compile(self._decode_compute, mode=mode, dynamic=False)
        with self.state_restored():
            start = time.perf_counter()
            self.step()
            if self.cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

    @torch.no_grad()
    def capture(self) -> None:
        """Captures the decode step (``_decode_compute``, compiled first when ``[model] kernels = "compile"``)
        in a CUDA graph (call after a prefill; the state is restored)."""
        self.compile()  # compilation and autotuning stay out of the capture
        with self.state_restored():
            self.graph = capture_graph(self.step)
