"""Token streams and batches.

A batch is a function of (seed, step) only: every rank draws the same global batch of
``global_batch`` windows of ``seq_length + 1`` tokens and keeps its data-parallel slice, so the
same seed trains on the same tokens at any parallel layout. Validation windows come from the
held-out tail of the corpus (the last ``valid_fraction`` of tokens) and never overlap training.
"""
from __future__ import annotations

import torch

from suite.errors import fail


def load_tokens(spec) -> torch.Tensor:
    """The whole corpus as a 1-D int64 tensor (tokenized once, then read from the token cache)."""
    from suite.data.prepare import corpus_tokens

    tokens, _ = corpus_tokens(spec)
    return torch.from_numpy(tokens.astype("int64"))


class TokenSource:
    """Deterministic batches of [n, seq_length + 1] token windows."""

    def __init__(self, spec):
        self.seed = spec.workload.seed
        self.seq = spec.workload.seq_length
        self.vocab = spec.model.vocab_size
        self.synthetic = spec.data.source == "synthetic"
        if not self.synthetic:
            tokens = load_tokens(spec)
            n_valid = max(int(len(tokens) * spec.data.valid_fraction), self.seq + 1)
            self.train, self.valid = tokens[:-n_valid], tokens[-n_valid:]
            for part, name in ((self.train, "training"), (self.valid, "validation")):
                if len(part) < self.seq + 1:
                    fail(spec, "data.valid_fraction", f"the {name} split has {len(part)} tokens, fewer than "
                         f"one sequence of {self.seq + 1}.",
                         "use a larger corpus, a shorter seq_length or another valid_fraction.")

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        idx = starts[:, None] + torch.arange(self.seq + 1)[None, :]
        return tokens[idx]

    def train_batch(self, step: int, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 7919 + step)
        if self.synthetic:
            return torch.randint(0, self.vocab, (n, self.seq + 1), generator=gen)
        starts = torch.randint(0, len(self.train) - self.seq, (n,), generator=gen)
        return self._windows(self.train, starts)

    def valid_batch(self, index: int, n: int) -> torch.Tensor:
        if self.synthetic:
            gen = torch.Generator().manual_seed(self.seed * 7919 + 1_000_000_007 + index)
            return torch.randint(0, self.vocab, (n, self.seq + 1), generator=gen)
        # evenly spaced, fixed windows over the held-out tail
        count = (len(self.valid) - self.seq - 1) // max(1, self.seq) + 1
        starts = (torch.arange(index * n, (index + 1) * n) % count) * self.seq
        return self._windows(self.valid, starts)
