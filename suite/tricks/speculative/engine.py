"""The speculative engine: a draft and the target, each a ``suite.models.generate.Engine`` (its model and
KV cache), driven by cached forwards of one or more tokens (see the package docstring for the step).
With CUDA graphs, the draft's one-token forward and the verify forward of k + 1 tokens each run on
static buffers (``StaticForward``) and are captured once per grid point; acceptance and rollback stay on
the host, between the graphs (one device-to-host read of the accepted length per verify step).

A cached forward of s tokens at positions start..start+s-1 sets the shared ``DecodeState`` to those
positions and to a mask with one row per new token (row i sees positions <= start + i), then runs
megatron's embedding, the decoder's layers (all, or the first N for a self-speculative draft, then the
final norm) and the LM head. Rollback is bookkeeping: the next forward starts at the accepted length,
masks everything after it and overwrites it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from suite.metrics import flops as F
from suite.models.generate import Engine, capture_graph
from suite.tricks.speculative import SpeculativeConfig, draft_model, self_layers


@dataclass
class Stats:
    """What one request did: its verify steps, their accepted counts, and every forward run
    (``(role, batch, new, start, head)``, for ``request_flops``)."""

    k: int
    batch: int
    accepted: list[int] = field(default_factory=list)  # per verify step: accepted proposals (batch minimum)
    accepted_per_sequence: list[int] = field(default_factory=list)  # per step: summed over the batch
    forwards: list[tuple] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.accepted)

    def acceptance_rate(self) -> float | None:
        return sum(self.accepted) / (self.k * self.steps) if self.steps else None

    def accepted_rate_per_sequence(self) -> float | None:
        return sum(self.accepted_per_sequence) / (self.k * self.steps * self.batch) if self.steps else None

    def tokens_per_step(self) -> float | None:
        return (sum(self.accepted) + self.steps) / self.steps if self.steps else None


def forward_on(engine: Engine, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
               layers: int | None = None, last_only: bool = False) -> torch.Tensor:
    """Feeds ``tokens`` [b, s] at positions ``pos`` [s] (``mask`` [1, 1, s, capacity]: row i sees positions
    <= pos[i]) through the first ``layers`` layers (all: None) with ``engine``'s caches; greedy-ready logits
    [b, s, vocab] (``last_only``: [b, 1, vocab])."""
    m, st = engine.model, engine.state
    st.mode, st.pos, st.mask = "decode", pos, mask
    rope = engine.rope.index_select(0, pos)
    hidden = m.embedding(input_ids=tokens, position_ids=None)
    if layers is None:
        hidden = m.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    else:
        for layer in m.decoder.layers[:layers]:
            hidden, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
        hidden = m.decoder.final_layernorm(hidden)
    if last_only:
        hidden = hidden[-1:]
    logits, _ = m.output_layer(hidden)
    return gather_from_tensor_model_parallel_region(logits)[..., :engine.spec.model.vocab_size].transpose(0, 1)


def cached_forward(engine: Engine, tokens: torch.Tensor, start: int, layers: int | None = None,
                   last_only: bool = False) -> torch.Tensor:
    """``forward_on`` at positions start.. (fresh position and mask tensors: any number of tokens)."""
    s = tokens.shape[1]
    pos = torch.arange(start, start + s, device=engine.device)
    return forward_on(engine, tokens, pos, engine.positions <= pos.view(1, 1, s, 1), layers, last_only)


class StaticForward:
    """One cached forward of a fixed shape on static buffers (tokens, positions, mask, greedy output), so it
    can be captured in a CUDA graph: ``capture()`` records it, and calls then replay it; before that, calls
    compute it eagerly on the same buffers (what the CPU tests check against the dynamic path)."""

    def __init__(self, engine: Engine, batch: int, new: int, layers: int | None = None, last_only: bool = False):
        dev = engine.device
        self.engine, self.layers, self.last_only = engine, layers, last_only
        self.tokens = torch.zeros(batch, new, dtype=torch.long, device=dev)
        self.offsets = torch.arange(new, device=dev)
        self.pos = torch.zeros(new, dtype=torch.long, device=dev)
        self.mask = torch.zeros(1, 1, new, engine.positions.shape[-1], dtype=torch.bool, device=dev)
        self.out = torch.zeros(batch, 1 if last_only else new, dtype=torch.long, device=dev)
        self.graph = None

    def compute(self) -> None:
        torch.le(self.engine.positions, self.pos.view(1, 1, -1, 1), out=self.mask)
        logits = forward_on(self.engine, self.tokens, self.pos, self.mask, self.layers, self.last_only)
        self.out.copy_(logits.argmax(dim=-1))

    def capture(self) -> None:
        self.graph = capture_graph(self.compute)

    def __call__(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The greedy tokens after each of ``tokens`` fed at positions start.. (a copy: the buffer is reused)."""
        self.tokens.copy_(tokens)
        torch.add(self.offsets, start, out=self.pos)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.compute()
        return self.out.clone()


class Speculative:
    """Target and draft on this rank; ``generate(prompt, gen)`` returns the target's greedy tokens."""

    def __init__(self, spec, cfg: SpeculativeConfig, log=print, group_timeout_s: float | None = None):
        self.spec, self.k = spec, cfg.k
        self.target = Engine(spec, log, group_timeout_s=group_timeout_s)  # a parallel mode's layout included
        self.self_layers = self_layers(cfg)
        if self.self_layers is None:  # a second model: same seed and precision, its own shape and init
            self.draft = Engine(replace(spec, model=draft_model(spec, cfg), tricks={}, modes={}), log)
        else:
            self.draft = self.target  # the target's first layers, on its cache
        self.cuda, self.device = self.target.cuda, self.target.device
        self.pos = 0  # position of ``x``, the target's latest greedy token, not yet fed to it
        self.static = None  # (draft, verify) StaticForwards once ``use_static_forwards`` ran

    @property
    def engines(self) -> list[Engine]:
        return [self.target] if self.draft is self.target else [self.target, self.draft]

    def allocate(self, batch: int, capacity: int) -> None:
        for e in self.engines:
            e.allocate(batch, capacity)

    def release(self) -> None:
        self.static = None
        for e in self.engines:
            e.release()

    def use_static_forwards(self, prompt: torch.Tensor, graph: bool) -> None:
        """From now until ``release``, the draft's one-token forwards and the verify forward run on static
        buffers, captured in CUDA graphs when ``graph`` (call after ``allocate``; it runs one prefill of
        ``prompt`` for the capture, whose writes the next request's prefill and steps overwrite). A draft
        catch-up of two tokens then runs as two one-token forwards."""
        b = prompt.shape[0]
        self.static = (StaticForward(self.draft, b, 1, self.self_layers, last_only=True),
                       StaticForward(self.target, b, self.k + 1))
        if graph:
            self.prefill(prompt)
            for forward in self.static:
                forward(torch.zeros_like(forward.tokens), prompt.shape[1])  # plausible positions to capture at
                forward.capture()

    def close(self) -> None:
        for e in self.engines:
            e.close()

    # --- one request, in steps (the workload times them) ------------------------------------------

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> Stats:
        """Both prefills; the first greedy token is the target's. Returns the request's fresh stats."""
        b, p = prompt.shape
        self.stats = Stats(self.k, b)
        self.target.prefill(prompt)
        self.stats.forwards.append(("prefill", b, p, 0, 1))
        if self.draft is not self.target:
            self.draft.prefill(prompt)
            self.stats.forwards.append(("draft_prefill", b, p, 0, 1))
        self.x = self.target.tokens.clone()
        self.pos = self.draft_pos = p
        self.pending = self.x  # the draft's next input, starting at draft_pos
        return self.stats

    @torch.no_grad()
    def propose(self) -> torch.Tensor:
        """k draft tokens [b, k] continuing from ``x`` (the draft's forwards, cache advanced)."""
        out, inp, at = [], self.pending, self.draft_pos
        for _ in range(self.k):
            if self.static is not None:  # one token at a time on the static one-token forward
                for j in range(inp.shape[1]):
                    nxt = self.static[0](inp[:, j:j + 1], at + j)
                    self.stats.forwards.append(("draft", inp.shape[0], 1, at + j, 1))
            else:
                logits = cached_forward(self.draft, inp, at, self.self_layers, last_only=True)
                self.stats.forwards.append(("draft", inp.shape[0], inp.shape[1], at, 1))
                nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            at += inp.shape[1]
            inp = nxt
            out.append(inp)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One verify step: proposals, one target forward over [x, d1..dk], acceptance and rollback.
        Returns the tokens it emits [b, n + 1]."""
        k, pos = self.k, self.pos
        d = self.propose()
        fed = torch.cat([self.x, d], dim=1)
        if self.static is not None:
            g = self.static[1](fed, pos)
        else:
            g = cached_forward(self.target, fed, pos).argmax(dim=-1)
        self.stats.forwards.append(("verify", d.shape[0], k + 1, pos, k + 1))
        # g [b, k + 1]: the target's choice after x, d1, ..., dk
        agree = torch.cumprod((d == g[:, :k]).long(), dim=1).sum(dim=1)  # per sequence
        n = int(agree.min())
        self.stats.accepted.append(n)
        self.stats.accepted_per_sequence.append(int(agree.sum()))
        emitted = torch.cat([d[:, :n], g[:, n:n + 1]], dim=1)
        self.x = g[:, n:n + 1].contiguous()
        self.pos = pos + n + 1
        if self.draft is self.target or n < k:  # the draft's cache holds x, d1..dn: continue from x
            self.pending, self.draft_pos = self.x, self.pos
        else:  # all accepted: the draft never saw dk
            self.pending, self.draft_pos = torch.cat([d[:, k - 1:], self.x], dim=1), pos + k
        return emitted

    def capacity(self, prompt: int, gen: int) -> int:
        """Cache positions a request of ``gen`` tokens may touch: a verify step looks k past the last one."""
        return prompt + gen + self.k

    @torch.no_grad()
    def request(self, prompt: torch.Tensor, gen: int, clock=None) -> torch.Tensor:
        """One request on allocated caches: the prefills, then verify steps until ``gen`` tokens follow the
        first one; returns them [b, gen + 1]. ``clock`` (start/stop) times the prefill and every step."""
        clock = clock or _Untimed()
        clock.start()
        self.prefill(prompt)
        clock.stop()
        out, produced = [self.x], 1
        while produced < gen + 1:
            clock.start()
            emitted = self.step()
            clock.stop()
            out.append(emitted)
            produced += emitted.shape[1]
        return torch.cat(out, dim=1)[:, :gen + 1]

    def generate(self, prompt: torch.Tensor, gen: int) -> torch.Tensor:
        """``request`` on freshly allocated caches, released after."""
        self.allocate(prompt.shape[0], self.capacity(prompt.shape[1], gen))
        try:
            return self.request(prompt, gen)
        finally:
            self.release()


class _Untimed:
    def start(self):
        pass

    def stop(self):
        pass


def shapes(spec, cfg) -> tuple[F.Shape, tuple[F.Shape, int]]:
    """(target shape, (draft shape, draft layers)) for ``request_flops``."""
    from suite.tricks.speculative import draft_shape

    return F.Shape.of(spec.model), draft_shape(spec, cfg)
