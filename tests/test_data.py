"""Corpora and tokenizers: the same content always gives the same tokens, from the cache or not.

Scenario-level bad data (missing files, bad JSON lines, vocabulary too small) lives in
tests/scenarios/bad/data_*.toml; the cases here need files written on the fly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from suite.data.prepare import cache_key, corpus_tokens, text_bytes, tokenize, train_bpe
from suite.data.sources import read_documents
from suite.data.tokens import TokenSource
from suite.errors import UserError
from suite.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "corpus"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SUITE_CACHE", str(folder))
    return folder


def spec_for(tmp_path, data: str, model: str = 'preset = "tiny"', seq: int = 16):
    path = tmp_path / "s.toml"
    path.write_text(f"[model]\n{model}\n[workload]\nseq_length = {seq}\n[data]\n{data}\n")
    (v,) = load_scenario(path)
    return v


def jsonl_spec(tmp_path, tokenizer="byte", extra=""):
    return spec_for(tmp_path, f'source = "jsonl"\npath = "{CORPUS / "docs.jsonl"}"\ntokenizer = "{tokenizer}"\n'
                    f"{extra}", model='preset = "tiny"\nvocab_size = 512')


def test_byte_text_batches_are_the_raw_bytes_as_before(tmp_path):
    spec = spec_for(tmp_path, 'source = "text"\npath = "builtin:shakespeare"')
    src = TokenSource(spec)
    raw = torch.tensor(list((ROOT / "suite" / "data" / "corpus" / "shakespeare.txt").read_bytes()))
    assert torch.equal(torch.cat([src.train, src.valid]), raw)
    # the batch formula of the original TokenSource, on the raw bytes
    n_valid = max(int(len(raw) * spec.data.valid_fraction), 17)
    gen = torch.Generator().manual_seed(spec.workload.seed * 7919 + 3)
    starts = torch.randint(0, len(raw) - n_valid - 16, (4,), generator=gen)
    assert torch.equal(src.train_batch(3, 4), raw[:-n_valid][starts[:, None] + torch.arange(17)])


def test_cache_same_content_same_key_changed_content_new_key(tmp_path, cache):
    text = tmp_path / "c.txt"
    text.write_text("hello world, " * 50)
    spec = spec_for(tmp_path, f'source = "text"\npath = "{text}"')
    key = cache_key(spec)
    first, path = corpus_tokens(spec)
    assert path == cache / f"{key}.npy" and path.is_file()
    again, path2 = corpus_tokens(spec)  # from the cache
    assert cache_key(spec) == key and path2 == path and np.array_equal(first, again)
    text.write_text("hello world! " * 50)
    assert cache_key(spec) != key
    assert not np.array_equal(corpus_tokens(spec)[0], first)
    # the tokenizer and the split are part of the key too
    assert cache_key(spec_for(tmp_path, f'source = "text"\npath = "{text}"\nvalid_fraction = 0.1')) != cache_key(spec)


def test_jsonl_documents_and_byte_tokens(tmp_path):
    spec = jsonl_spec(tmp_path)
    docs = read_documents(spec)
    lines = (CORPUS / "docs.jsonl").read_text().splitlines()
    assert docs == [json.loads(line)["text"] for line in lines] and len(docs) == 40
    expected = b"".join(d.encode() + b"\n" for d in docs)  # one newline ends each document
    assert tokenize(spec).tolist() == list(expected)


def test_jsonl_text_key(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "first"}\n\n{"body": "second"}\n')  # blank lines are skipped
    spec = spec_for(tmp_path, f'source = "jsonl"\npath = "{rows}"\ntext_key = "body"')
    assert read_documents(spec) == ["first", "second"]


def test_bpe_is_deterministic_and_within_its_vocabulary(tmp_path):
    spec = jsonl_spec(tmp_path, "bpe", "bpe_vocab_size = 300")
    docs = read_documents(spec)
    a, b = train_bpe(spec, docs), train_bpe(spec, docs)
    assert a.get_vocab() == b.get_vocab()
    tokens = tokenize(spec)
    assert np.array_equal(tokens, tokenize(spec))
    assert tokens.max() < 300 and len(tokens) < len((CORPUS / "docs.jsonl").read_bytes())
    end = a.token_to_id("<|endoftext|>")
    assert (tokens == end).sum() == 40  # one end-of-text token per document
    assert a.decode([t for t in tokens.tolist() if t != end]).startswith(docs[0])


def test_text_bytes_are_the_utf8_bytes_the_tokens_stand_for(tmp_path, cache):
    """The denominator of bits per byte. docs.jsonl has multi-byte characters (Über café naïve —)."""
    docs = read_documents(jsonl_spec(tmp_path))
    text = sum(len(d.encode()) for d in docs)
    assert text > sum(len(d) for d in docs)
    byte = jsonl_spec(tmp_path)
    assert text_bytes(byte, tokenize(byte)) == text + len(docs)  # the newline after each document is a byte
    bpe = jsonl_spec(tmp_path, "bpe", "bpe_vocab_size = 300")
    tokens, _ = corpus_tokens(bpe)
    saved = cache / f"{cache_key(bpe)}.bpe.json"
    assert saved.is_file()  # the trained BPE is kept beside its tokens
    assert text_bytes(bpe, tokens) == text  # end-of-text tokens stand for no text
    unicode = docs[2]
    assert unicode.startswith("Über") and len(unicode.encode()) > len(unicode)
    assert text_bytes(bpe, train_bpe(bpe, docs).encode(unicode).ids) == len(unicode.encode())
    saved.unlink()  # a cache from before tokenizers were kept: trained again, the same
    assert text_bytes(bpe, tokens) == text and saved.is_file()


def test_hf_tokenizer_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = jsonl_spec(tmp_path, "bpe", "bpe_vocab_size = 300")
    bpe = train_bpe(spec, read_documents(spec))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path / "tok")
    spec = jsonl_spec(tmp_path, "hf:tok")
    tokens = tokenize(spec)
    assert tokens.tolist() == [t for d in read_documents(spec) for t in bpe.encode(d).ids + [hf.eos_token_id]]
    assert text_bytes(spec, tokens) == sum(len(d.encode()) for d in read_documents(spec))  # eos: no bytes
    # a tokenizer larger than the model's vocabulary: caught when the scenario is loaded
    with pytest.raises(UserError, match=r"the tokenizer hf:tok \(300 tokens\) gives token id 299, but the "
                                        r"model's vocab_size is 256") as e:
        spec_for(tmp_path, 'source = "text"\npath = "builtin:shakespeare"\ntokenizer = "hf:tok"')
    assert e.value.key == "model.vocab_size" and e.value.fix


def write_indexed(prefix: Path, docs: list[list[int]]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def test_megatron_indexed_dataset_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(20, 60, size=10)]
    write_indexed(tmp_path / "ds", docs)
    spec = spec_for(tmp_path, 'source = "megatron"\npath = "ds"')
    src = TokenSource(spec)
    assert torch.cat([src.train, src.valid]).tolist() == [t for d in docs for t in d]
    assert src.train_batch(0, 2).shape == (2, 17)

    write_indexed(tmp_path / "big", [[1, 2, 300]])  # an id the tiny model (vocab 256) cannot embed
    with pytest.raises(UserError, match=r"gives token id 300, but the model's vocab_size is 256") as e:
        spec_for(tmp_path, 'source = "megatron"\npath = "big"')
    assert e.value.key == "model.vocab_size" and "vocab_size = 301" in e.value.fix


def test_corpus_too_small_for_a_sequence(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("short")
    with pytest.raises(UserError, match="fewer than one sequence"):
        TokenSource(spec_for(tmp_path, f'source = "text"\npath = "{text}"'))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_not_utf8_is_caught_at_validate_time(tmp_path, tokenizer):
    text = tmp_path / "c.txt"
    text.write_bytes(b"abc \xff\xfe def" * 20)
    with pytest.raises(UserError, match="is not UTF-8 text \\(byte 4\\)") as e:
        spec_for(tmp_path, f'source = "text"\npath = "{text}"\ntokenizer = "{tokenizer}"\nbpe_vocab_size = 300',
                 model='preset = "tiny"\nvocab_size = 512')
    assert e.value.key == "data.path"


def test_cli_data_prepare(tmp_path, cache):
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'[model]\npreset = "tiny"\nvocab_size = 512\n[workload]\nseq_length = 16\n[data]\n'
                        f'source = "jsonl"\npath = "{CORPUS / "docs.jsonl"}"\n'
                        '[variants.byte]\n[variants.bpe.data]\ntokenizer = "bpe"\nbpe_vocab_size = 300\n')
    r = subprocess.run([sys.executable, "-m", "suite", "data", "prepare", str(scenario)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "SUITE_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    n_bytes = len(b"".join(json.loads(x)["text"].encode() + b"\n"
                           for x in (CORPUS / "docs.jsonl").read_text().splitlines()))
    assert f"byte: jsonl {CORPUS / 'docs.jsonl'} / byte: {n_bytes:,} tokens" in r.stdout
    assert "bpe: jsonl" in r.stdout and "cached in" in r.stdout
    assert len(list(cache.glob("*.npy"))) == 2


def test_shipped_technique_corpus_is_the_one_the_reports_were_measured_on(tmp_path):
    """builtin:shakespeare_wikitext = Tiny Shakespeare + WikiText-2 valid, byte for byte, under the file name
    the committed reports used (.data/shakespeare_wikitext.txt): the same token cache key, so the same tokens."""
    import hashlib

    from suite.data.sources import BUILTIN

    shipped = BUILTIN["shakespeare_wikitext"]
    data = shipped.read_bytes()
    assert hashlib.sha256(data).hexdigest() == "1bff46e97c6e8ef579f0ff6546c54c84821758431306ca1fdbaaaf2322863e75"
    assert data.startswith(BUILTIN["shakespeare"].read_bytes())  # Tiny Shakespeare first
    assert data[1115394:].startswith(b" \n = Homarus gammarus = \n")  # then WikiText-2 valid
    assert (shipped.parent / "LICENSE-CC-BY-SA-3.0.txt").is_file()
    copy = tmp_path / ".data" / "shakespeare_wikitext.txt"
    copy.parent.mkdir()
    copy.write_bytes(data)
    model = 'preset = "tiny"\nvocab_size = 1024'
    for tokenizer in ("byte", "bpe"):
        builtin = spec_for(tmp_path, f'source = "text"\npath = "builtin:shakespeare_wikitext"\ntokenizer = "{tokenizer}"', model=model)
        old = spec_for(tmp_path, f'source = "text"\npath = ".data/shakespeare_wikitext.txt"\ntokenizer = "{tokenizer}"',
                       model=model)
        assert cache_key(builtin) == cache_key(old)


def test_hf_dataset_saved_to_disk_gives_the_tokens_of_the_same_json_lines(tmp_path):
    """source = "hf" reads a `datasets` folder offline (load_from_disk); rows are documents, as JSON lines are."""
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line)["text"] for line in (CORPUS / "docs.jsonl").read_text().splitlines() if line.strip()]
    datasets.Dataset.from_dict({"text": rows, "n": list(range(len(rows)))}).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": rows}),
                          "test": datasets.Dataset.from_dict({"body": ["held out"]})}).save_to_disk(str(tmp_path / "dd"))
    model = 'preset = "tiny"\nvocab_size = 512'
    jsonl = tokenize(jsonl_spec(tmp_path))
    one = spec_for(tmp_path, f'source = "hf"\npath = "{tmp_path / "one"}"', model=model)
    assert np.array_equal(tokenize(one), jsonl)
    split = spec_for(tmp_path, f'source = "hf"\npath = "{tmp_path / "dd"}"\ntext_key = "body"', model=model)
    assert np.array_equal(tokenize(split), jsonl)  # the train split by default
    test = spec_for(tmp_path, f'source = "hf"\npath = "{tmp_path / "dd"}"\ntext_key = "body"\nsplit = "test"',
                    model=model)
    assert bytes(tokenize(test).astype(np.uint8)) == b"held out\n"
    assert cache_key(test) != cache_key(split)
    for data, key, words in [
            (f'path = "{tmp_path / "dd"}"\ntext_key = "body"\nsplit = "dev"', "data.split", "splits train, test"),
            (f'path = "{tmp_path / "one"}"\ntext_key = "n"', "data.text_key", "no string column 'n'"),
            (f'path = "{tmp_path / "one"}"\nsplit = "train"', "data.split", "a single Dataset, without splits"),
            (f'path = "{CORPUS}"', "data.path", "is not a dataset saved with save_to_disk"),
            (f'path = "{tmp_path / "nowhere"}"', "data.path", "does not exist")]:
        with pytest.raises(UserError) as e:
            spec_for(tmp_path, 'source = "hf"\n' + data, model=model)
        assert e.value.key == key and words in str(e.value), str(e.value)
