"""Reading corpora and checking them, torch-free: `suite validate` runs `check_data` on every variant,
so a broken corpus fails in one line before any process starts or any model is built.

Sources: 'text' (one UTF-8 file), 'jsonl' (one JSON object per line, the text under `text_key`),
'megatron' (an already tokenized megatron indexed dataset: PREFIX.bin + PREFIX.idx).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from suite.errors import fail

# Corpora shipped in the package (corpus/README.md: sources, licences, checksums). shakespeare_wikitext is
# byte-identical to, and named as, the file the committed reports were measured on: same tokens, same cache.
BUILTIN = {name: Path(__file__).parent / "corpus" / f"{name}.txt" for name in ("shakespeare", "shakespeare_wikitext")}
BPE_END = "<|endoftext|>"  # separates JSON-lines documents in the trained BPE vocabulary
# megatron indexed dataset: .idx header = magic, version <Q, dtype code <B (megatron's DType enum)
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}


def resolve_path(spec) -> Path:
    path = spec.data.path
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN:
            fail(spec, "data.path", f"no builtin corpus '{name}'.",
                  f"use one of: {', '.join('builtin:' + b for b in BUILTIN)}.")
        return BUILTIN[name]
    return (Path(spec.file).parent / path).resolve()


def corpus_files(spec) -> list[Path]:
    """The files whose content defines the corpus (the cache key hashes them)."""
    path = resolve_path(spec)
    if spec.data.source == "megatron":
        return [Path(f"{path}.idx"), Path(f"{path}.bin")]
    return [path]


def read_bytes(spec, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        fail(spec, "data.path", f"cannot read the corpus {path} ({e.strerror}).",
              "point data.path at a readable, non-empty file (relative to the scenario file).")
    if not data:
        fail(spec, "data.path", f"the corpus {path} is empty.", "point data.path at a non-empty file.")
    return data


def _decode(spec, path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(spec, "data.path", f"the corpus {path} is not UTF-8 (byte {e.start}).",
              "convert the file to UTF-8.")


def read_documents(spec) -> list:
    """'text': [the file's bytes] (the byte tokenizer reads raw bytes, as always); 'jsonl': the texts."""
    d = spec.data
    path = resolve_path(spec)
    data = read_bytes(spec, path)
    if d.source == "text":
        return [data]
    docs = []
    for number, line in enumerate(_decode(spec, path, data).splitlines(), 1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not documents
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(spec, "data.path", f"line {number} of {path} is not JSON ({e.msg}).",
                  "write one JSON object per line.")
        if not isinstance(row, dict) or not isinstance(row.get(d.text_key), str):
            fail(spec, "data.text_key", f"line {number} of {path} has no string under '{d.text_key}'.",
                  f"give every line a \"{d.text_key}\" string, or set text_key to the key that holds the text.")
        docs.append(row[d.text_key])
    if not any(docs):
        fail(spec, "data.path", f"the corpus {path} has no text.", "add documents with non-empty text.")
    return docs


def megatron_dtype(spec) -> str:
    idx = corpus_files(spec)[0]
    head = read_bytes(spec, idx)[:len(IDX_MAGIC) + 9]
    if len(head) < len(IDX_MAGIC) + 9 or not head.startswith(IDX_MAGIC):
        fail(spec, "data.path", f"{idx} is not a megatron indexed dataset index.",
              "set path to the PREFIX of PREFIX.bin/PREFIX.idx written by megatron's IndexedDatasetBuilder.")
    code = struct.unpack("<B", head[len(IDX_MAGIC) + 8:])[0]
    return IDX_DTYPES.get(code, "int64")


def check_vocab(spec, largest: int, what: str) -> None:
    """Token ids must be < [model] vocab_size, else the embedding lookup fails deep inside a run."""
    vocab = spec.model.vocab_size
    if largest >= vocab:
        fail(spec, "model.vocab_size", f"{what} gives token id {largest}, but the model's vocab_size is {vocab}.",
              f"set [model] vocab_size = {largest + 1} or more, or use a smaller tokenizer.")


def hf_dir(spec) -> Path:
    return (Path(spec.file).parent / spec.data.tokenizer.split(":", 1)[1]).resolve()


def check_data(spec) -> None:
    """Every data check that needs no torch: sources, tokenizers, files, JSON lines, vocabulary sizes."""
    d, m = spec.data, spec.model
    if not 0 < d.valid_fraction < 1:
        fail(spec, "data.valid_fraction", f"must be between 0 and 1, got {d.valid_fraction}.", "use e.g. 0.05.")
    if d.source == "synthetic":
        return
    if not d.path:
        fail(spec, "data.path", f"source = '{d.source}' needs a path.",
              "set path = \"builtin:shakespeare\" or a file relative to the scenario.")
    if d.tokenizer not in ("byte", "bpe") and not d.tokenizer.startswith("hf:"):
        fail(spec, "data.tokenizer", f"unknown tokenizer '{d.tokenizer}'.", 'use "byte", "bpe" or "hf:PATH".')
    for path in corpus_files(spec):
        if not path.is_file():
            kind = {"text": "text file", "jsonl": "JSON-lines file", "megatron": "indexed dataset file"}[d.source]
            fail(spec, "data.path", f"{kind} '{d.path}' does not exist (looked for {path}).",
                  "give a path relative to the scenario file" +
                  (" (the PREFIX of PREFIX.bin/PREFIX.idx)." if d.source == "megatron" else ", or builtin:shakespeare."))
    if d.source == "megatron":
        import numpy as np

        dtype, bin_path = megatron_dtype(spec), corpus_files(spec)[1]
        if bin_path.stat().st_size == 0:
            fail(spec, "data.path", f"the corpus {bin_path} is empty.", "point data.path at a non-empty dataset.")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")  # mapped, not read: datasets can be large
        check_vocab(spec, int(tokens.max()), f"the indexed dataset {d.path}")
        return
    if d.source == "jsonl":
        read_documents(spec)  # line-numbered errors now, not in the middle of a run
    else:
        read_bytes(spec, corpus_files(spec)[0])
    if d.tokenizer == "byte" and m.vocab_size < 256:
        fail(spec, "model.vocab_size", f"the byte tokenizer needs vocab_size >= 256, got {m.vocab_size}.",
              "set vocab_size = 256 or more.")
    if d.tokenizer == "bpe":
        if d.bpe_vocab_size < 257:  # 256 byte symbols + the end-of-text token
            fail(spec, "data.bpe_vocab_size", f"bpe_vocab_size must be at least 257, got {d.bpe_vocab_size}.",
                  "use e.g. bpe_vocab_size = 1024.")
        check_vocab(spec, d.bpe_vocab_size - 1, f"the BPE tokenizer (bpe_vocab_size {d.bpe_vocab_size})")
    if d.tokenizer.startswith("hf:"):
        folder = hf_dir(spec)
        if not folder.is_dir():
            fail(spec, "data.tokenizer", f"tokenizer folder {folder} does not exist.",
                  "give hf:PATH to a local Hugging Face tokenizer folder, relative to the scenario file.")
        if (folder / "tokenizer.json").is_file():  # fast tokenizers: sized without transformers (or torch)
            from tokenizers import Tokenizer

            size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
            check_vocab(spec, size - 1, f"the tokenizer {d.tokenizer} ({size} tokens)")
