"""Scoring primitives over a log-prob model (see ``suite.eval``): log-likelihoods of continuations,
rolling log-likelihood of a text, greedy generation.

A *window* is a token list scored by feeding ``window[:-1]`` and reading the log-probs of its last
``n`` tokens; windows of a batch are right-padded, which a causal model never looks at.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from suite.data.prepare import ByteTokenizer  # noqa: F401  (suite.eval's byte tokenizer, defined with the others)

Model = Callable[[torch.Tensor], torch.Tensor]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces of the context move to the continuation, and
    the continuation's tokens are those of context + continuation past the context's own tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def score(model: Model, windows: Sequence[tuple[list[int], int]], batch_size: int = 16
          ) -> list[tuple[float, bool]]:
    """(sum of log-probs, greedy?) of the last ``n`` tokens of each ``(window, n)``.

    greedy: every one of those tokens is the argmax of its row (lm-eval's ``is_greedy``).
    """
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # less padding per batch
    out: list = [None] * len(windows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        length = max(len(windows[i][0]) for i in batch) - 1
        inputs = torch.zeros(len(batch), length, dtype=torch.long)
        for row, i in enumerate(batch):
            window = windows[i][0]
            inputs[row, :len(window) - 1] = torch.tensor(window[:-1])
        logprobs = model(inputs)
        for row, i in enumerate(batch):
            window, n = windows[i]
            end = len(window) - 1
            rows = logprobs[row, end - n:end]  # the rows predicting window[-n:]
            target = torch.tensor(window[-n:], device=rows.device)
            ll = rows.gather(-1, target[:, None]).double().sum()
            out[i] = (float(ll), bool((rows.argmax(-1) == target).all()))
    return out


def loglikelihoods(model: Model, tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None = None,
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """lm-eval's ``loglikelihood``: (log p(continuation | context), greedy?) per (context, continuation).

    An empty context conditions on the tokenizer's BOS token; a context longer than ``max_length``
    keeps its last tokens.
    """
    windows = []
    for context, continuation in pairs:
        if context:
            ctx, cont = encode_pair(tokenizer, context, continuation)
        else:
            if tokenizer.bos_token_id is None:
                raise ValueError("an empty context needs a tokenizer with a BOS token to condition on")
            ctx, cont = [tokenizer.bos_token_id], tokenizer.encode(continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        if max_length is not None and len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {max_length}")
        whole = ctx + cont
        windows.append((whole[-(max_length + 1):] if max_length else whole, len(cont)))
    return score(model, windows, batch_size)


def rolling_windows(tokens: Sequence[int], max_length: int, stride: int | None = None
                    ) -> list[tuple[list[int], int]]:
    """Windows scoring every token after the first exactly once, each with as much context as fits
    in ``max_length`` inputs (lm-eval's ``get_rolling_token_windows`` with tokens[0] as the prefix).

    ``stride`` (default ``max_length``): after the first window, each window moves on ``stride`` tokens
    and scores those, seeing the ``max_length - stride`` tokens before them as extra context (the
    strided perplexity of transformers' guide; more context per token, max_length / stride times the
    compute)."""
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride {stride} is not between 1 and max_length {max_length}")
    tokens = list(tokens)
    end = min(max_length + 1, len(tokens))
    windows = [(tokens[:end], end - 1)] if end > 1 else []
    while end < len(tokens):
        new_end = min(end + stride, len(tokens))
        windows.append((tokens[max(0, new_end - max_length - 1):new_end], new_end - end))
        end = new_end
    return windows


def rolling_loglikelihood(model: Model, tokens: Sequence[int], max_length: int, prefix: int | None = None,
                          batch_size: int = 16, stride: int | None = None) -> tuple[float, int]:
    """(total log-likelihood, tokens scored) of a token sequence in rolling windows.

    With ``prefix`` (a BOS/EOT id) every token is scored, conditioned on it, as lm-eval does; without
    one (the byte tokenizer) the first token only serves as context.
    """
    (out,) = rolling_loglikelihoods(model, [tokens], max_length, prefix, batch_size, stride)
    return out


def window_loglikelihoods(model: Model, tokens: Sequence[int], max_length: int, prefix: int | None = None,
                          batch_size: int = 16, stride: int | None = None) -> list[tuple[float, int]]:
    """(log-likelihood, tokens scored) of each rolling window of one token sequence, in order: the terms
    whose sums ``rolling_loglikelihood`` returns (per-window samples of a held-out loss)."""
    windows = rolling_windows(([prefix] if prefix is not None else []) + list(tokens), max_length, stride)
    return [(ll, n) for (ll, _), (_, n) in zip(score(model, windows, batch_size), windows)]


def rolling_loglikelihoods(model: Model, texts: Sequence[Sequence[int]], max_length: int, prefix: int | None = None,
                           batch_size: int = 16, stride: int | None = None) -> list[tuple[float, int]]:
    """``rolling_loglikelihood`` of many token sequences, their windows batched together (lm-eval's
    ``loglikelihood_rolling`` requests are mostly shorter than one window each); ``stride``: see
    ``rolling_windows``."""
    windows, owner = [], []
    for i, tokens in enumerate(texts):
        mine = rolling_windows(([prefix] if prefix is not None else []) + list(tokens), max_length, stride)
        windows += mine
        owner += [i] * len(mine)
    out = [[0.0, 0] for _ in texts]
    for i, (ll, _), (_, n) in zip(owner, score(model, windows, batch_size), windows):
        out[i][0] += ll
        out[i][1] += n
    return [(ll, n) for ll, n in out]


@torch.no_grad()
def greedy_generate(model: Model, tokenizer, context: str, until: Sequence[str] = (), max_new_tokens: int = 256,
                    max_length: int | None = None) -> str:
    """Greedy continuation of ``context``, cut before the first stop string in ``until`` and ended by
    the tokenizer's EOS token. Recomputes the whole window per token (no KV cache): simple, for evals."""
    ids = tokenizer.encode(context) or ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    if not ids:
        raise ValueError("an empty context needs a tokenizer with a BOS token to condition on")
    new: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        window = (ids + new)[-max_length:] if max_length else ids + new
        token = int(model(torch.tensor([window]))[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        text = tokenizer.decode(new)
        cuts = [text.index(s) for s in until if s and s in text]
        if cuts:
            return text[:min(cuts)]
    return text
