"""Tokenizing a corpus once: tokenizers, the token cache and `suite data prepare`.

Tokens are cached in ``$SUITE_CACHE`` (default ``.cache/suite/tokens/``, git-ignored) under a hash of
the corpus files' content, the tokenizer's identity and the split settings, so a changed file or
tokenizer can never reuse stale tokens, and every rank and every run of a variant reads the same ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from suite.errors import fail
from suite.data.sources import (BPE_END, check_data, check_vocab, corpus_files, hf_dir, hf_split_folder,
                                read_documents, resolve_path)

CHUNK_CHARS = 1 << 16  # text is tokenized in newline-aligned pieces: progress, and bounded memory


def cache_dir() -> Path:
    return Path(os.environ.get("SUITE_CACHE") or Path(".cache") / "suite" / "tokens")


def _hash_files(digest, paths) -> None:
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)


def tokenizer_identity(spec) -> str:
    t = spec.data.tokenizer
    if t == "bpe":
        return f"bpe:{spec.data.bpe_vocab_size}"
    if t.startswith("hf:"):  # the tokenizer files' content, not the folder name (weights are skipped)
        digest = hashlib.sha256()
        names = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")
        _hash_files(digest, sorted(p for p in hf_dir(spec).iterdir()
                                   if p.is_file() and (p.name.startswith(names) or p.suffix == ".model")))
        return "hf:" + digest.hexdigest()
    return t


def cache_key(spec) -> str:
    d = spec.data
    digest = hashlib.sha256(json.dumps({
        "version": 1, "source": d.source, "text_key": d.text_key if d.source in ("jsonl", "hf") else None,
        **({"split": hf_split_folder(spec).name} if d.source == "hf" else {}),
        "tokenizer": tokenizer_identity(spec), "valid_fraction": d.valid_fraction}).encode())
    _hash_files(digest, corpus_files(spec))
    return digest.hexdigest()[:32]


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _train_split(spec, docs: list[str]) -> list[str]:
    """The head of the corpus the BPE is trained on: validation text never shapes the vocabulary."""
    keep = 1 - spec.data.valid_fraction
    if spec.data.source == "text":
        return _chunks(docs[0][:int(len(docs[0]) * keep)])
    return docs[:max(1, int(len(docs) * keep))]


def bpe_tokenizer(spec, docs: list[str] | None = None):
    """The variant's trained BPE, kept beside its tokens in the cache (``<key>.bpe.json``) so that
    evaluation can map token ids back to bytes; trained again (deterministic) when missing."""
    from tokenizers import Tokenizer

    path = cache_dir() / f"{cache_key(spec)}.bpe.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    bpe = train_bpe(spec, docs if docs is not None else _texts(spec))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.json")  # ranks may race: write whole, then rename
    bpe.save(str(tmp))
    os.replace(tmp, path)
    return bpe


def hf_tokenizer(spec):
    """The ``hf:PATH`` tokenizer of ``[data] tokenizer``, from its local directory (no network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir(spec)), local_files_only=True)


class _Encoder:
    """encode/decode over a ``tokenizers`` BPE or a Hugging Face tokenizer, special tokens left out (as the
    corpus was tokenized), for suite.eval's scorers."""

    def __init__(self, encode, decode, bos=None, eos=None):
        self.encode, self.decode, self.bos_token_id, self.eos_token_id = encode, decode, bos, eos


class ByteTokenizer:
    """UTF-8 bytes as tokens (suite's ``[data] tokenizer = "byte"``); it has no BOS/EOT token."""

    bos_token_id = None
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def text_tokenizer(spec):
    """The variant's tokenizer as suite.eval expects it: ``encode(text) -> ids``, ``decode(ids) -> text``."""
    t = spec.data.tokenizer
    if t == "byte":
        return ByteTokenizer()
    if t == "bpe":
        bpe = bpe_tokenizer(spec)
        return _Encoder(lambda text: bpe.encode(text, add_special_tokens=False).ids, bpe.decode)
    hf = hf_tokenizer(spec)
    return _Encoder(lambda text: hf.encode(text, add_special_tokens=False), hf.decode, hf.bos_token_id,
                    hf.eos_token_id)


def text_bytes(spec, ids) -> int:
    """UTF-8 bytes of the text that the variant's token ids stand for (the denominator of bits per byte).

    byte: one byte a token. bpe: a byte-level token's symbols are one byte each, the end-of-text token
    none (exact). hf:PATH: the bytes of the decoded ids, special tokens skipped (a character split at
    either end of the ids decodes to U+FFFD: a few bytes off at most).
    """
    ids = [int(i) for i in ids]
    t = spec.data.tokenizer
    if t == "byte":
        return len(ids)
    if t == "bpe":
        bpe = bpe_tokenizer(spec)
        special = set(bpe.get_added_tokens_decoder())
        lengths = {i: 0 if i in special else len(bpe.id_to_token(i)) for i in set(ids)}
        return sum(lengths[i] for i in ids)
    hf = hf_tokenizer(spec)
    return len(hf.decode(ids, skip_special_tokens=True).encode("utf-8"))


def train_bpe(spec, docs: list[str]):
    """A byte-level BPE with bpe_vocab_size ids (the end-of-text token included); deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.data.bpe_vocab_size, special_tokens=[BPE_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_train_split(spec, docs), trainer=trainer)
    return tok


def _progress(total: int, label: str, show: bool):
    """update(n) advances a tqdm bar (or a printed percentage) by n units; silent unless show."""
    if not show:
        return lambda n: None, lambda: None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=label, unit="piece", file=sys.stdout)
        return bar.update, bar.close
    except ImportError:
        done = [0]

        def update(n):
            done[0] += n
            print(f"\r{label}: {100 * done[0] // max(total, 1)}%", end="", flush=True)
        return update, print


def _texts(spec) -> list[str]:
    """The corpus's documents as text (a 'text' corpus is one document)."""
    docs = read_documents(spec)
    if spec.data.source == "text":
        try:
            docs = [docs[0].decode("utf-8")]
        except UnicodeDecodeError as e:
            fail(spec, "data.path", f"the corpus {resolve_path(spec)} is not UTF-8 (byte {e.start}).",
                 "convert the file to UTF-8.")
    return docs


def tokenize(spec, show: bool = False) -> np.ndarray:
    """The whole corpus as token ids (not read from the token cache; a trained BPE is saved there):
    documents of a JSON-lines file end with an end token."""
    d = spec.data
    jsonl = d.source in ("jsonl", "hf")  # documents, each ended by an end token
    if d.tokenizer == "byte":
        docs = read_documents(spec)
        data = b"".join(doc.encode() + b"\n" for doc in docs) if jsonl else docs[0]
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    docs = _texts(spec)
    if d.tokenizer == "bpe":
        bpe = bpe_tokenizer(spec, docs)
        end = bpe.token_to_id(BPE_END)
        encode = lambda texts: [e.ids for e in bpe.encode_batch(texts)]  # noqa: E731
    else:
        hf = hf_tokenizer(spec)
        check_vocab(spec, len(hf) - 1, f"the tokenizer {d.tokenizer} ({len(hf)} tokens)")
        end = hf.eos_token_id
        encode = lambda texts: hf(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    pieces = _chunks(docs[0]) if not jsonl else docs
    update, close = _progress(len(pieces), f"{spec.name}: tokenizing {d.path}", show)
    ids: list[int] = []
    for i in range(0, len(pieces), 256):
        for row in encode(pieces[i:i + 256]):
            ids.extend(row)
            if jsonl and end is not None:
                ids.append(end)
        update(len(pieces[i:i + 256]))
    close()
    return np.asarray(ids, dtype=np.int32)


def read_megatron(spec) -> np.ndarray:
    """An indexed dataset's sequences, in order, as one stream (already tokens: no tokenizer, no cache)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(resolve_path(spec)), mmap=True)
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def corpus_tokens(spec, show: bool = False) -> tuple[np.ndarray, Path | None]:
    """(token ids, cache file): tokenized once, then read from the cache."""
    check_data(spec)  # specs built by hand skip `suite validate`; the checks are cheap next to tokenizing
    if spec.data.source == "megatron":
        tokens = read_megatron(spec)
        check_vocab(spec, int(tokens.max()), f"the indexed dataset {spec.data.path}")
        return tokens, None
    path = cache_dir() / f"{cache_key(spec)}.npy"
    if path.is_file():
        return np.load(path), path
    tokens = tokenize(spec, show)
    if len(tokens) == 0:
        fail(spec, "data.path", f"the corpus {resolve_path(spec)} has no tokens.", "point data.path at a file with text.")
    check_vocab(spec, int(tokens.max()), f"the tokenizer {spec.data.tokenizer}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # ranks may race: write whole, then rename
    np.save(tmp, tokens)
    os.replace(tmp, path)
    return tokens, path


def prepare_command(variants) -> int:
    """`suite data prepare SCENARIO`: tokenize and cache every variant's corpus, print token counts
    (``variants``: the scenario's resolved variants; the command line loads them, so data never imports
    the scenario language that validates against it)."""
    done: dict[str, tuple] = {}
    for spec in variants:
        if spec.data.source == "synthetic":
            print(f"{spec.name}: synthetic tokens, nothing to prepare")
            continue
        key = cache_key(spec) if spec.data.source != "megatron" else str(corpus_files(spec))
        if key not in done:
            tokens, path = corpus_tokens(spec, show=True)
            n_valid = max(int(len(tokens) * spec.data.valid_fraction), spec.workload.seq_length + 1)
            done[key] = (len(tokens), n_valid, path)
        total, n_valid, path = done[key]
        where = f"cached in {path}" if path else "read in place"
        print(f"{spec.name}: {spec.data.source} {spec.data.path} / {spec.data.tokenizer}: {total:,} tokens "
              f"({total - n_valid:,} training, {n_valid:,} validation), {where}")
    return 0
