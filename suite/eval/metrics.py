"""Held-out text metrics (loss, perplexity, bits per byte) and zero-shot multiple choice (acc,
acc_norm); the definitions are in ``suite.eval``'s docstring."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from suite.errors import UserError, fail
from suite.eval.core import Model, loglikelihoods, window_loglikelihoods


def text_metrics(model: Model, tokens: Sequence[int] | torch.Tensor, seq_length: int, num_bytes: int | None = None,
                 batch_size: int = 8, stride: int | None = None, prefix: int | None = None) -> dict:
    """loss (nats/token), perplexity and bits per byte of a token stream (tokens[0] is context only,
    unless a ``prefix`` token such as BOS conditions it), and ``window_losses``: the loss of each rolling
    window in order (samples for a paired comparison of two models on the same text).

    ``num_bytes``: UTF-8 bytes of the scored tokens; default: one byte per token, right for the byte
    tokenizer. ``stride``: see ``suite.eval.core.rolling_windows``.
    """
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    windows = window_loglikelihoods(model, tokens, seq_length, prefix, batch_size, stride)
    ll, n = sum(w for w, _ in windows), sum(k for _, k in windows)
    if n == 0:
        raise ValueError("a text of fewer than 2 tokens has nothing to score")
    num_bytes = n if num_bytes is None else num_bytes
    loss = -ll / n
    bpb = -ll / (num_bytes * math.log(2)) if num_bytes else None  # None: tokens that stand for no text
    return {"loss": loss, "perplexity": math.exp(loss), "bpb": bpb, "tokens": n, "bytes": num_bytes,
            "window_losses": [-w / k for w, k in windows if k]}


TEXT_SOURCES = ("text", "jsonl", "hf")  # corpora whose tokens stand for known text, so bytes can be counted


def heldout_tokens(spec) -> torch.Tensor:
    """The variant's validation tail of its text corpus (the windows validation loss also reads)."""
    from suite.data.tokens import TokenSource

    if spec.data.source not in TEXT_SOURCES:
        fail(spec, "data.source", "held-out text metrics need a text corpus.",
             'set source = "text" (or "jsonl") and a path.')
    return TokenSource(spec).valid


def measures_heldout(spec) -> bool:
    """Whether a training variant ends with ``heldout_text``: ``[eval] heldout_text`` on a text corpus."""
    return spec.eval.heldout_text and spec.data.source in TEXT_SOURCES


def heldout_max_tokens(spec) -> int:
    """``[eval] heldout_max_tokens``, by default the tokens one validation scores."""
    w = spec.workload
    given = spec.eval.heldout_max_tokens
    return given if given is not None else w.eval_batches * w.global_batch * w.seq_length


def heldout_text(spec, model: Model, valid: torch.Tensor | None = None, batch_size: int = 8) -> dict:
    """The record's ``metrics.heldout``: ``text_metrics`` of ``model`` on the start of the validation tail
    (``valid``, default ``heldout_tokens(spec)``), at most ``heldout_max_tokens(spec)`` scored tokens in
    rolling windows of ``seq_length``; bytes from the variant's tokenizer (``suite.data.prepare.text_bytes``).

    Rolling windows of seq_length over the tail's start are the windows validation loss reads
    (``TokenSource.valid_batch``): with the default token count, the loss is the validation loss,
    computed another way (log-softmax of the gathered logits instead of megatron's vocab-parallel
    cross-entropy).

    {loss (nats/token), perplexity, bpb, tokens (scored), bytes (theirs, UTF-8), seq_length}
    """
    from suite.data.prepare import text_bytes

    valid = heldout_tokens(spec) if valid is None else valid
    tokens = valid[:heldout_max_tokens(spec) + 1]  # the first token is context only
    seq = spec.workload.seq_length
    m = text_metrics(model, tokens, seq, text_bytes(spec, tokens[1:].tolist()), batch_size)
    return {**m, "seq_length": seq}


def file_text(spec, model: Model, tokenizer, batch_size: int = 8) -> dict:
    """``[eval] text``: ``text_metrics`` of a UTF-8 file tokenized by the variant's tokenizer, in windows
    of ``seq_length`` moved by ``text_stride`` (default seq_length). With a BOS token every token is
    scored conditioned on it and the bytes are the file's; without, the first token is context only
    and its bytes are not counted.

    {loss, perplexity (per token), bpb, tokens, bytes, seq_length, stride, path}
    """
    path = Path(spec.file).parent / spec.eval.text
    text = read_text(spec)
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_token_id", None)
    seq = spec.workload.seq_length
    stride = spec.eval.text_stride or seq
    if bos is not None:
        num_bytes = len(text.encode("utf-8"))
    else:  # the first token is not scored: the bytes of the others (suite.data.prepare.text_bytes)
        from suite.data.prepare import text_bytes

        num_bytes = text_bytes(spec, ids[1:])
    m = text_metrics(model, ids, seq, num_bytes, batch_size, stride, prefix=bos)
    return {**m, "seq_length": seq, "stride": stride, "path": str(path)}


def read_text(spec) -> str:
    """The ``[eval] text`` file's text; UserError when it is missing, not UTF-8 or too short to score."""
    path = Path(spec.file).parent / spec.eval.text
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        fail(spec, "eval.text", f"cannot read {path} ({e.strerror or e}).",
             "give a UTF-8 text file, relative to the scenario file.")
    except UnicodeDecodeError as e:
        fail(spec, "eval.text", f"{path} is not UTF-8 (byte {e.start}: {e.reason}).",
             "convert the file to UTF-8 (e.g. iconv -t UTF-8).")
    if len(text.strip()) < 2:
        fail(spec, "eval.text", f"{path} holds no text to score.", "give a file with the text to score.")
    return text


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


def read_examples(path: str | Path) -> list[Example]:
    """JSON lines ``{"context": str, "choices": [str, ...], "label": int}`` (blank lines skipped)."""
    path = Path(path)
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            context, choices, label = row["context"], row["choices"], row["label"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"not a multiple-choice example ({type(e).__name__}: {e}).", file=where,
                            fix='write one JSON object per line: {"context": ..., "choices": [...], "label": i}.'
                            ) from None
        if not (isinstance(context, str) and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices)):
            raise UserError("context must be a string and choices a list of 2 or more non-empty strings.",
                            file=where, fix="fix that line.")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(f"label {label!r} is not an index into the {len(choices)} choices.", file=where,
                            fix=f"use an integer from 0 to {len(choices) - 1}.")
        examples.append(Example(context, tuple(choices), label))
    return examples


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first maximum, as numpy


def multiple_choice(model: Model, tokenizer, examples: Sequence[Example], delimiter: str = " ",
                    max_length: int | None = None, batch_size: int = 16) -> dict:
    """acc and acc_norm (with stderr) over the examples, plus each example's log-likelihoods and its
    correctness (``per_example``: 1.0 or 0.0 per example, in order, for acc and acc_norm)."""
    if not examples:
        raise ValueError("no multiple-choice examples to score")
    pairs = [(ex.context, delimiter + choice) for ex in examples for choice in ex.choices]
    results = iter(loglikelihoods(model, tokenizer, pairs, max_length, batch_size))
    acc, acc_norm, lls = [], [], []
    for ex in examples:
        ll = [next(results)[0] for _ in ex.choices]
        acc.append(float(_argmax(ll) == ex.label))
        acc_norm.append(float(_argmax([x / len(c) for x, c in zip(ll, ex.choices)]) == ex.label))
        lls.append(ll)
    (a, a_se), (n, n_se) = _mean_stderr(acc), _mean_stderr(acc_norm)
    return {"acc": a, "acc_stderr": a_se, "acc_norm": n, "acc_norm_stderr": n_se, "n": len(examples),
            "loglikelihoods": lls, "per_example": {"acc": acc, "acc_norm": acc_norm}}
