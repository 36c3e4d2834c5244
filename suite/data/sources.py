"""Reading corpora and checking them, torch-free: `suite validate` runs `check_data` on every variant,
so a broken corpus fails in one line before any process starts or any model is built.

Sources: 'text' (one UTF-8 file), 'jsonl' (one JSON object per line, the text under `text_key`),
'hf' (a Hugging Face `datasets` dataset saved with `save_to_disk`: read offline, memory-mapped, with
`load_from_disk`; one document per row, the text under `text_key`), 'megatron' (an already tokenized
megatron indexed dataset: PREFIX.bin + PREFIX.idx).
"""
from __future__ import annotations

import codecs
import errno
import json
import os
import stat
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


PROBE = 1 << 16  # bytes read from each end of a text corpus at validate time (binary, encoding)


def file_problem(path: Path, folder: bool = False) -> str | None:
    """Why ``path`` cannot be read as a regular file (or a folder); None when it can.

    Plain ``Path.is_file()`` answers False for a folder, a symlink loop or a NUL byte alike (so users were
    told "does not exist") and raises for a name longer than the system allows; a FIFO or a device would
    make the reader block or never end. One sentence per case instead.
    """
    text = str(path)
    if "\0" in text:
        return "the path contains a NUL byte"
    try:
        st = os.stat(text)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return f"the path is longer than the system allows ({len(text)} characters)"
        if e.errno == errno.ELOOP:
            return f"{path} is a loop of symbolic links"
        if e.errno == errno.ENOENT and os.path.islink(text):
            return f"{path} is a symbolic link to {os.readlink(text)}, which does not exist"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{path} does not exist"
        return f"{path} cannot be read ({e.strerror})"
    if folder:
        return None if stat.S_ISDIR(st.st_mode) else f"{path} is not a folder"
    if stat.S_ISDIR(st.st_mode):
        return f"{path} is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file (a pipe, socket or device)"
    if not os.access(text, os.R_OK):
        return f"{path} is not readable (permission denied)"
    return None


def resolve_path(spec) -> Path:
    path = spec.data.path
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN:
            fail(spec, "data.path", f"no builtin corpus '{name}'.",
                  f"use one of: {', '.join('builtin:' + b for b in BUILTIN)}.")
        return BUILTIN[name]
    joined = Path(spec.file).parent / path
    try:
        return joined.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop (RuntimeError before Python 3.13), a NUL byte
        fail(spec, "data.path", f"cannot use the corpus path: {file_problem(joined) or 'it does not resolve'}.",
             "point data.path at a readable file, relative to the scenario file.")


def corpus_files(spec) -> list[Path]:
    """The files whose content defines the corpus (the cache key hashes them)."""
    path = resolve_path(spec)
    if spec.data.source == "megatron":
        return [Path(f"{path}.idx"), Path(f"{path}.bin")]
    if spec.data.source == "hf":  # the split's Arrow files and metadata (a DatasetDict: the split's folder)
        folder = hf_split_folder(spec)
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    return [path]


def hf_split_folder(spec) -> Path:
    """A save_to_disk folder of one Dataset, or the chosen split's folder of a DatasetDict."""
    path = resolve_path(spec)
    splits = hf_splits(path)
    if splits is None:
        return path
    split = spec.data.split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
    return path / split


def hf_splits(path: Path) -> list[str] | None:
    """The split names of a DatasetDict folder (its dataset_dict.json), None for a single Dataset."""
    index = path / "dataset_dict.json"
    if file_problem(index):
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8")).get("splits")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return [str(s) for s in splits] if isinstance(splits, list) else []


def read_hf(spec, *, texts: bool = True):
    """The hf source's dataset (load_from_disk, memory-mapped), checked; with texts, its documents."""
    d = spec.data
    path = resolve_path(spec)
    fix = "save the dataset with Dataset.save_to_disk (or DatasetDict.save_to_disk) and set path to that folder."
    problem = file_problem(path, folder=True)
    if problem:
        fail(spec, "data.path", f"Hugging Face dataset folder '{d.path}' does not exist (looked for {path})."
             if problem.endswith("does not exist") else f"cannot use the dataset folder: {problem}.", fix)
    splits = hf_splits(path)
    if splits is not None:
        split = hf_split_folder(spec).name
        if split not in splits:
            fail(spec, "data.split", f"the dataset at {path} has splits {', '.join(splits) or '(none)'}, not "
                 f"'{split}'.", f"set split to one of: {', '.join(splits)}." if splits else fix)
    elif d.split is not None:
        fail(spec, "data.split", f"the dataset at {path} is a single Dataset, without splits.", "remove split.")
    try:
        import datasets
    except ImportError:
        fail(spec, "data.source", "source = 'hf' needs the `datasets` library.", "pip install datasets.")
    try:
        ds = datasets.load_from_disk(str(hf_split_folder(spec)))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors, ...
        fail(spec, "data.path", f"{path} is not a dataset saved with save_to_disk ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}).", fix)
    feature = ds.features.get(d.text_key)
    if feature is None or getattr(feature, "dtype", None) not in ("string", "large_string"):
        columns = ", ".join(f"{k} ({getattr(v, 'dtype', type(v).__name__)})" for k, v in ds.features.items())
        fail(spec, "data.text_key", f"the dataset at {path} has no string column '{d.text_key}' (columns: "
             f"{columns or 'none'}).", "set text_key to the column that holds the text.")
    if len(ds) == 0:
        fail(spec, "data.path", f"the dataset at {path} has no rows.", "point path at a dataset with text.")
    if not texts:
        return ds
    docs = [t for t in ds[d.text_key] if t]  # missing or empty texts are not documents
    if not docs:
        fail(spec, "data.path", f"the corpus {path} has no text.", "add documents with non-empty text.")
    return docs


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
    if d.source == "hf":
        return read_hf(spec)
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


def check_text(spec, path: Path, key: str = "data.path", what: str = "corpus") -> None:
    """A text file (a corpus, a task file) is UTF-8 text: its first and last PROBE bytes are read (cheap at
    any size), and a NUL byte or bytes that are not UTF-8 there fail now rather than in the middle of a run."""
    size = path.stat().st_size
    if size == 0:
        fail(spec, key, f"the {what} {path} is empty.", f"point {key} at a non-empty file.")
    with open(path, "rb") as f:
        head = f.read(PROBE)
        f.seek(max(size - PROBE, len(head)))
        tail = f.read()
    for offset, part in ((0, head), (size - len(tail), tail)):
        nul = part.find(b"\0")
        if nul >= 0:
            fail(spec, key, f"the {what} {path} is binary (a NUL byte at offset {offset + nul}), not text.",
                 "give a UTF-8 text file" + (" (source = \"megatron\" reads tokenized datasets)."
                                             if key == "data.path" else "."))
        if offset:  # the tail may start inside a character: skip continuation bytes
            part = part.lstrip(bytes(range(0x80, 0xC0)))
        try:
            codecs.getincrementaldecoder("utf-8")().decode(part, final=False)
        except UnicodeDecodeError as e:
            fail(spec, key, f"the {what} {path} is not UTF-8 text (byte {offset + e.start}).",
                 "convert the file to UTF-8.")


def megatron_dtype(spec) -> str:
    idx = corpus_files(spec)[0]
    head = read_bytes(spec, idx)[:len(IDX_MAGIC) + 9]
    if len(head) < len(IDX_MAGIC) + 9 or not head.startswith(IDX_MAGIC):
        fail(spec, "data.path", f"{idx} is not a megatron indexed dataset index.",
              "set path to the PREFIX of PREFIX.bin/PREFIX.idx written by megatron's IndexedDatasetBuilder.")
    code = struct.unpack("<B", head[len(IDX_MAGIC) + 8:])[0]
    if IDX_DTYPES.get(code) not in ("uint8", "int8", "int16", "int32", "int64", "uint16"):
        fail(spec, "data.path", f"{idx} stores tokens as dtype code {code} "
             f"({IDX_DTYPES.get(code, 'unknown')}), not integers.",
             "write the dataset with an integer dtype (megatron's IndexedDatasetBuilder, e.g. numpy.int32).")
    return IDX_DTYPES[code]


def check_megatron(spec, dtype: str) -> None:
    """The .idx's sequence lengths must account for the .bin's bytes exactly (a truncated or mismatched
    pair otherwise reads past the end, or silently drops data, deep inside a run)."""
    import numpy as np

    idx, bin_path = corpus_files(spec)
    header = len(IDX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype, sequence count, document count
    idx_size, bin_size = idx.stat().st_size, bin_path.stat().st_size
    with open(idx, "rb") as f:
        f.seek(len(IDX_MAGIC) + 9)
        counts = f.read(16)
        if len(counts) < 16:
            fail(spec, "data.path", f"{idx} is truncated (its header ends at byte {idx_size}).",
                 "write the .idx again with megatron's IndexedDatasetBuilder.")
        sequences, documents = struct.unpack("<QQ", counts)
        need = header + 12 * sequences + 8 * documents
        if idx_size < need:
            fail(spec, "data.path", f"{idx} holds {idx_size} bytes; its header announces {sequences} sequences "
                 f"and {documents} documents ({need} bytes).", "write the .idx again (it is truncated).")
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    itemsize = np.dtype(dtype).itemsize
    expected = int(lengths.astype(np.int64).sum()) * itemsize
    if bin_size != expected:
        fail(spec, "data.path", f"{bin_path} holds {bin_size} bytes, but {idx.name} describes {expected} "
             f"({int(lengths.sum())} tokens of {itemsize} byte{'s' * (itemsize > 1)}): the pair disagree.",
             "use the .bin and .idx written together by one IndexedDatasetBuilder.")


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
    if d.source == "hf":
        read_hf(spec, texts=False)  # the folder, split, column and row count; texts are read when tokenizing
    for path in corpus_files(spec) if d.source != "hf" else []:
        problem = file_problem(path)
        if problem:
            kind = {"text": "text file", "jsonl": "JSON-lines file", "megatron": "indexed dataset file"}[d.source]
            missing = problem.endswith("does not exist")
            fail(spec, "data.path", f"{kind} '{d.path}' does not exist (looked for {path})." if missing
                 else f"cannot use the {kind} '{d.path}': {problem}.",
                  "give a path relative to the scenario file" +
                  (" (the PREFIX of PREFIX.bin/PREFIX.idx)." if d.source == "megatron"
                   else f", or one of {', '.join('builtin:' + b for b in BUILTIN)}."))
    if d.source == "megatron":
        import numpy as np

        dtype, bin_path = megatron_dtype(spec), corpus_files(spec)[1]
        if bin_path.stat().st_size == 0:
            fail(spec, "data.path", f"the corpus {bin_path} is empty.", "point data.path at a non-empty dataset.")
        check_megatron(spec, dtype)
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")  # mapped, not read: datasets can be large
        if int(tokens.min()) < 0:
            fail(spec, "data.path", f"the indexed dataset {d.path} holds a negative token id {int(tokens.min())}.",
                 "token ids are 0 .. vocab_size - 1; write the dataset with an unsigned or wider dtype.")
        check_vocab(spec, int(tokens.max()), f"the indexed dataset {d.path}")
        check_split_sizes(spec, len(tokens), exact=True)
        return
    if d.source != "hf":
        check_text(spec, corpus_files(spec)[0])
    if d.source == "jsonl":
        read_documents(spec)  # line-numbered errors now, not in the middle of a run
    if d.tokenizer == "byte" and m.vocab_size < 256:
        fail(spec, "model.vocab_size", f"the byte tokenizer needs vocab_size >= 256, got {m.vocab_size}.",
              "set vocab_size = 256 or more.")
    if d.tokenizer == "bpe":
        if d.bpe_vocab_size < 257:  # 256 byte symbols + the end-of-text token
            fail(spec, "data.bpe_vocab_size", f"bpe_vocab_size must be at least 257, got {d.bpe_vocab_size}.",
                  "use e.g. bpe_vocab_size = 1024.")
        check_vocab(spec, d.bpe_vocab_size - 1, f"the BPE tokenizer (bpe_vocab_size {d.bpe_vocab_size})")
    if d.tokenizer.startswith("hf:"):
        check_hf_tokenizer(spec)
    if d.source != "hf":
        # every tokenizer here gives at most one token a byte, plus an end and a start token a document
        # (a line at most); a large file is not read for its lines, a byte each bounds them
        path = corpus_files(spec)[0]
        size = path.stat().st_size
        lines = read_bytes(spec, path).count(b"\n") if size <= 1 << 24 else size
        check_split_sizes(spec, size + 2 * (1 + lines), exact=False)


def check_split_sizes(spec, tokens: int, exact: bool) -> None:
    """Both splits hold at least one window of seq_length + 1 tokens, split as suite.data.tokens does;
    ``tokens``: the corpus's token count, or (not exact) an upper bound on it."""
    seq = spec.workload.seq_length
    n_valid = max(int(tokens * spec.data.valid_fraction), seq + 1)
    train = tokens - n_valid
    if train < seq + 1:
        count = f"{tokens:,} tokens" if exact else f"at most {tokens:,} tokens (bytes and lines)"
        fail(spec, "data.path", f"the corpus holds {count}: after the validation tail of {n_valid:,} the training "
             f"split has {max(train, 0):,}, fewer than one sequence of seq_length + 1 = {seq + 1:,}.",
             f"use a corpus of more than {2 * (seq + 1):,} tokens or a shorter seq_length.")
    longest = max(spec.workload.prompt_lengths) if spec.workload.kind == "inference" else 0
    if longest > n_valid:  # inference prompts are cut from the validation tail (workloads.inference.prompt_tokens)
        fail(spec, "workload.prompt_lengths", f"a prompt of {longest:,} tokens is longer than the corpus's "
             f"validation tail ({'' if exact else 'at most '}{n_valid:,} tokens), which prompts are cut from.",
             "use shorter prompts, a larger corpus or a larger data.valid_fraction.")


def check_hf_tokenizer(spec) -> None:
    """An hf:PATH tokenizer folder exists and holds readable tokenizer files; sized against the model."""
    d = spec.data
    fix = "give hf:PATH to a local Hugging Face tokenizer folder (tokenizer.json or tokenizer_config.json), " \
          "relative to the scenario file."
    try:
        folder = hf_dir(spec)
    except (OSError, RuntimeError, ValueError):
        folder = Path(spec.file).parent / d.tokenizer.split(":", 1)[1]
    problem = file_problem(folder, folder=True)
    if problem:
        fail(spec, "data.tokenizer", f"tokenizer folder {folder} does not exist." if problem.endswith("does not exist")
             else f"cannot use the tokenizer folder: {problem}.", fix)
    files = {name: folder / name for name in ("tokenizer.json", "tokenizer_config.json")}
    present = {name: path for name, path in files.items() if file_problem(path) is None}
    if not present:
        fail(spec, "data.tokenizer", f"the tokenizer folder {folder} has neither tokenizer.json nor "
             "tokenizer_config.json.", fix)
    for name, path in present.items():  # both are JSON; a truncated file fails here, not inside transformers
        try:
            json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(spec, "data.tokenizer", f"{path} is not valid JSON ({e}); the file is truncated or damaged.",
                 "save the tokenizer again (tokenizer.save_pretrained(folder)).")
    if "tokenizer.json" in present:  # fast tokenizers: sized without transformers (or torch)
        from tokenizers import Tokenizer

        try:
            size = Tokenizer.from_file(str(present["tokenizer.json"])).get_vocab_size(with_added_tokens=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # its own exception types for a bad file; a Rust panic is a BaseException
            fail(spec, "data.tokenizer", f"{present['tokenizer.json']} is not a tokenizer the tokenizers "
                 f"library can read ({str(e).splitlines()[0] if str(e) else type(e).__name__}).",
                 "save the tokenizer again (tokenizer.save_pretrained(folder)).")
        check_vocab(spec, size - 1, f"the tokenizer {d.tokenizer} ({size} tokens)")
