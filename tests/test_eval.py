"""suite.eval with a tiny deterministic model: a bigram table over bytes with hand-chosen probabilities.

P(next | prev), every row normalised over the 256 bytes:
* prev 'a': 'b' 0.6, each other byte 0.4/255;
* prev 'b': 'b' 0.9, each other byte 0.1/255;
* any other prev: 'a' 0.5, 'b' 0.25, each other byte 0.25/254 (call its log r).

tests/data/eval/tiny_mc.jsonl, scored with lm-eval's rules (continuation = " " + choice; acc_norm divides
by the choice's length in characters), by hand:
1. "Q:" [a, bbbb] label 1: ll(" a") = r + ln .5 = -7.617; ll(" bbbb") = r + ln .25 + 3 ln .9 = -8.626.
   acc picks "a" (wrong); per character -7.617 vs -2.157: acc_norm picks "bbbb" (right).
2. "Q:" [zz, a] label 1: " zz" = 3r = -20.77 vs -7.617: both right.
3. "Q:" [b, a] label 0: " b" = r + ln .25 = -8.310 vs -7.617: both wrong.
4. "Q: " [ab, ba] label 0: the context's trailing space moves into the continuation ("  ab"):
   2r + ln .5 + ln .6 vs 2r + ln .25 + ln(.1/255): both right.
acc = 2/4 = 0.5 (stderr sqrt(1/3 / 4) = 0.2887), acc_norm = 3/4 = 0.75 (stderr 0.25).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from suite.errors import UserError
from suite.eval import (ByteTokenizer, encode_pair, greedy_generate, loglikelihoods, multiple_choice,
                        read_examples, rolling_loglikelihood, text_metrics)
from suite.eval.core import rolling_windows

MC_FILE = Path(__file__).resolve().parent / "data" / "eval" / "tiny_mc.jsonl"
A, B = ord("a"), ord("b")


def bigram_table() -> torch.Tensor:
    p = torch.full((256, 256), 0.25 / 254, dtype=torch.float64)
    p[:, A], p[:, B] = 0.5, 0.25
    p[A], p[A, B] = 0.4 / 255, 0.6
    p[B], p[B, B] = 0.1 / 255, 0.9
    assert torch.allclose(p.sum(1), torch.ones(256, dtype=torch.float64))
    return p.log()


TABLE = bigram_table()


def bigram(tokens: torch.Tensor) -> torch.Tensor:
    """The model interface: [batch, length] tokens -> [batch, length, 256] next-token log-probs."""
    return TABLE[tokens]


def oracle(text: str) -> float:
    """Sum of log P over the text's bytes after the first, straight from the table."""
    data = text.encode()
    return sum(float(TABLE[a, b]) for a, b in zip(data, data[1:]))


R = math.log(0.25 / 254)


def test_hand_computed_loglikelihoods():
    pairs = [("Q:", " a"), ("Q:", " bbbb"), ("Q:", " zz"), ("Q: ", " ab"), ("Q: ", " ba")]
    got = loglikelihoods(bigram, ByteTokenizer(), pairs)
    expected = [R + math.log(.5), R + math.log(.25) + 3 * math.log(.9), 3 * R,
                2 * R + math.log(.5) + math.log(.6), 2 * R + math.log(.25) + math.log(.1 / 255)]
    for (ll, _), want, (ctx, cont) in zip(got, expected, pairs):
        assert ll == pytest.approx(want, abs=1e-9)
        assert ll == pytest.approx(oracle(ctx + cont) - oracle(ctx.rstrip()), abs=1e-9)
    # greedy: ' ' after ':' is never the argmax; "ab" after "Q" is ('a' after 'Q', then 'b' after 'a')
    assert [g for _, g in got] == [False, False, False, False, False]
    (_, greedy), = loglikelihoods(bigram, ByteTokenizer(), [("Q", "ab")])
    assert greedy


def test_multiple_choice_acc_and_acc_norm_by_hand():
    examples = read_examples(MC_FILE)
    assert len(examples) == 4  # the blank line is skipped
    result = multiple_choice(bigram, ByteTokenizer(), examples)
    assert result["n"] == 4
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.75
    assert result["acc_stderr"] == pytest.approx(math.sqrt(1 / 3 / 4))
    assert result["acc_norm_stderr"] == pytest.approx(0.25)
    first = result["loglikelihoods"][0]
    assert first == pytest.approx([R + math.log(.5), R + math.log(.25) + 3 * math.log(.9)])
    # batching does not change anything
    assert multiple_choice(bigram, ByteTokenizer(), examples, batch_size=1) == result


def test_context_conditions_the_continuation():
    """Delimiter "": the first choice byte is predicted from the context's last byte ('b' -> 'b' 0.9).
    Misaligned by one position, the row of 'x' would prefer 'a'."""
    from suite.eval import Example

    ex = [Example("xb", ("a", "b"), 1)]
    result = multiple_choice(bigram, ByteTokenizer(), ex, delimiter="")
    assert result["loglikelihoods"][0] == pytest.approx([math.log(.1 / 255), math.log(.9)])
    assert result["acc"] == 1.0


def test_encode_pair_moves_trailing_spaces_like_lm_eval():
    tok = ByteTokenizer()
    assert encode_pair(tok, "Q: ", " ab") == (list(b"Q:"), list(b"  ab"))
    assert encode_pair(tok, "Q:", " ab") == (list(b"Q:"), list(b" ab"))


def test_max_length_keeps_the_last_context_tokens():
    long_context = "x" * 50 + "Q:"
    full = loglikelihoods(bigram, ByteTokenizer(), [(long_context, " ab")])
    cut = loglikelihoods(bigram, ByteTokenizer(), [(long_context, " ab")], max_length=4)
    assert cut == full  # a bigram needs one token of context
    with pytest.raises(ValueError, match="exceeds max_length"):
        loglikelihoods(bigram, ByteTokenizer(), [("Q:", " abab")], max_length=3)
    with pytest.raises(ValueError, match="BOS"):
        loglikelihoods(bigram, ByteTokenizer(), [("", "ab")])


def test_rolling_windows_are_lm_evals():
    """The example of lm-eval's loglikelihood_rolling docstring: tokens 0..9, prefix BOS, max length 4."""
    bos = 99
    windows = rolling_windows([bos, *range(10)], 4)
    assert windows == [([bos, 0, 1, 2, 3], 4), ([3, 4, 5, 6, 7], 4), ([5, 6, 7, 8, 9], 2)]
    assert sum(n for _, n in rolling_windows(list(range(100)), 7)) == 99  # each token after the first once


def test_text_metrics_uniform_model_is_8_bits_per_byte():
    uniform = lambda t: torch.full((*t.shape, 256), -math.log(256))  # noqa: E731
    m = text_metrics(uniform, torch.tensor(list(b"held-out text " * 10)), seq_length=16)
    assert m["tokens"] == m["bytes"] == 139
    assert m["loss"] == pytest.approx(math.log(256))
    assert m["perplexity"] == pytest.approx(256)
    assert m["bpb"] == pytest.approx(8.0)


def test_text_metrics_bigram_by_hand():
    """"abab...": after 'a' a 'b' (ln .6), after 'b' an 'a' (ln(.1/255)), whatever the window cut."""
    text = "ab" * 20
    want_ll = 20 * math.log(.6) + 19 * math.log(.1 / 255)
    for seq in (3, 8, 64):
        m = text_metrics(bigram, list(text.encode()), seq_length=seq)
        assert m["tokens"] == 39
        assert m["loss"] == pytest.approx(-want_ll / 39)
        assert m["bpb"] == pytest.approx(-want_ll / (39 * math.log(2)))
    # bpb = loss * tokens / (bytes * ln 2): a tokenizer with 2 bytes per token halves it
    two = text_metrics(bigram, list(text.encode()), seq_length=8, num_bytes=78)
    assert two["bpb"] == pytest.approx(-want_ll / (78 * math.log(2)))
    assert rolling_loglikelihood(bigram, list(text.encode()), 8) == (pytest.approx(want_ll), 39)


def test_greedy_generation_follows_the_argmax_and_stops():
    tok = ByteTokenizer()
    # 'Q' -> 'a' (0.5) -> 'b' (0.6) -> 'b' (0.9) -> ...
    assert greedy_generate(bigram, tok, "Q", max_new_tokens=4) == "abbb"
    assert greedy_generate(bigram, tok, "Q", until=["bb"], max_new_tokens=10) == "a"  # "abb" cut before "bb"
    assert greedy_generate(bigram, tok, "Q", until=["\n", "zz"], max_new_tokens=3, max_length=1) == "abb"


def test_heldout_text_scores_the_start_of_the_validation_tail(tmp_path, monkeypatch):
    """metrics.heldout: heldout_max_tokens scored tokens in rolling windows over the validation tail."""
    from dataclasses import replace

    from suite.data.tokens import TokenSource
    from suite.eval.metrics import heldout_max_tokens, heldout_text, measures_heldout
    from suite.scenario import load_scenario

    monkeypatch.setenv("SUITE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "s.toml"
    path.write_text('[model]\npreset = "tiny"\n[workload]\nseq_length = 16\n'
                    '[data]\nsource = "text"\npath = "builtin:shakespeare"\n[eval]\nheldout_max_tokens = 40\n')
    (spec,) = load_scenario(path)
    seen = []

    def uniform(tokens):
        seen.append(tokens.clone())
        return torch.full((*tokens.shape, 256), -math.log(256))

    m = heldout_text(spec, uniform)
    assert m == {"loss": pytest.approx(math.log(256)), "perplexity": pytest.approx(256), "bpb": pytest.approx(8.0),
                 "tokens": 40, "bytes": 40, "seq_length": 16, "window_losses": [pytest.approx(math.log(256))] * 3}
    valid = TokenSource(spec).valid
    (inputs,) = seen  # windows of 17 scoring 16, 16, then the last 8 with 8 tokens of earlier context
    assert torch.equal(inputs, torch.stack([valid[0:16], valid[16:32], valid[24:40]]))
    # the default: as many tokens as one validation reads; only text corpora, only when asked
    default = replace(spec, eval=replace(spec.eval, heldout_max_tokens=None))
    assert heldout_max_tokens(default) == 4 * 8 * 16 and heldout_max_tokens(spec) == 40
    assert measures_heldout(spec) and measures_heldout(replace(spec, data=replace(spec.data, source="jsonl")))
    assert not measures_heldout(replace(spec, eval=replace(spec.eval, heldout_text=False)))
    for source in ("synthetic", "megatron"):
        assert not measures_heldout(replace(spec, data=replace(spec.data, source=source)))


@pytest.mark.parametrize("line, words", [
    ('{"context": "x", "choices": ["a"], "label": 0}', "2 or more"),
    ('{"context": "x", "choices": ["a", "b"], "label": 2}', "label 2"),
    ('{"context": "x", "choices": ["a", "b"]}', "KeyError"),
    ("not json", "not a multiple-choice example"),
])
def test_bad_examples_name_the_line(tmp_path, line, words):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"context": "x", "choices": ["a", "b"], "label": 0}\n' + line + "\n")
    with pytest.raises(UserError) as e:
        read_examples(path)
    assert e.value.file == f"{path}:2" and words in str(e.value)


def test_lm_eval_adapter():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")
    from lm_eval.api.instance import Instance

    from suite.eval.lm_eval_adapter import SuiteLM

    lm = SuiteLM(bigram, ByteTokenizer(), max_length=8)

    def req(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    (ll, greedy), = lm.loglikelihood([req("loglikelihood", "Q:", " a")])
    assert ll == pytest.approx(R + math.log(.5)) and not greedy
    (rolling,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", "ab" * 20)])
    assert rolling == pytest.approx(20 * math.log(.6) + 19 * math.log(.1 / 255))
    out = lm.generate_until([req("generate_until", "Q", {"until": ["bb"], "max_gen_toks": 10}),
                             req("generate_until", "Q", {"until": "zz", "max_gen_toks": 3})])
    assert out == ["a", "abb"]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([req("generate_until", "Q", {"do_sample": True, "temperature": 0.7})])


# --- [eval] text: any UTF-8 file, strided rolling windows ------------------------------------------

def test_strided_windows_score_every_token_once_with_more_context():
    tokens = list(range(20))
    for stride in (1, 3, 8):
        windows = rolling_windows(tokens, 8, stride)
        scored = [t for w, n in windows for t in w[len(w) - n:]]
        assert scored == tokens[1:]  # each token after the first, once, in order
        assert all(len(w) == 9 for w, _ in windows[1:])  # full windows: 8 inputs
        assert all(n <= stride for _, n in windows[1:])
    assert rolling_windows(tokens, 8, 8) == rolling_windows(tokens, 8)  # the default: lm-eval's
    assert rolling_windows(tokens, 8, 3)[1] == (list(range(3, 12)), 3)  # tokens 9-11, 5 more of context
    with pytest.raises(ValueError, match="stride 9"):
        rolling_windows(tokens, 8, 9)


class _BosBytes(ByteTokenizer):
    bos_token_id = ord("Q")


def _text_spec(tmp_path, text: bytes | str, **eval_keys):
    from suite.scenario import load_scenario

    (tmp_path / "test.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    keys = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in {"text": "test.txt", **eval_keys}.items())
    (tmp_path / "s.toml").write_text('[model]\npreset = "tiny"\n[workload]\nkind = "accuracy"\nseq_length = 8\n'
                                     '[data]\nsource = "text"\npath = "builtin:shakespeare"\n[eval]\n' + keys)
    return load_scenario(tmp_path / "s.toml")[0]


def test_file_text_by_hand(tmp_path):
    """"abab...ab" (40 bytes): the bigram's log-likelihood does not depend on the windows, so every
    stride gives the same numbers; with a BOS token ('Q') the first byte is scored too, after it."""
    from suite.eval.metrics import file_text

    want_ll = 20 * math.log(.6) + 19 * math.log(.1 / 255)
    for stride in (None, 1, 5, 8):
        spec = _text_spec(tmp_path, "ab" * 20, **({"text_stride": stride} if stride else {}))
        m = file_text(spec, bigram, ByteTokenizer())
        assert (m["tokens"], m["bytes"], m["seq_length"], m["stride"]) == (39, 39, 8, stride or 8)
        assert m["loss"] == pytest.approx(-want_ll / 39)
        assert m["bpb"] == pytest.approx(-want_ll / (39 * math.log(2)))
        assert m["perplexity"] == pytest.approx(math.exp(-want_ll / 39))
    m = file_text(_text_spec(tmp_path, "ab" * 20), bigram, _BosBytes())
    with_bos = want_ll + math.log(.5)  # 'a' after 'Q' (any byte but a/b): 0.5
    assert (m["tokens"], m["bytes"]) == (40, 40)
    assert m["loss"] == pytest.approx(-with_bos / 40)
    # bits per byte count UTF-8 bytes: 'é' is 2 bytes (and 2 byte tokens)
    m = file_text(_text_spec(tmp_path, "é" * 10), bigram, ByteTokenizer())
    assert m["tokens"] == m["bytes"] == 19


@pytest.mark.parametrize("keys, content, key, words", [
    ({"text": "missing.txt"}, b"x", "eval.text", "no text file at"),
    ({"text": "test.txt"}, b"caf\xe9 au lait", "eval.text", "is not UTF-8 (byte 3"),
    ({"text": "test.txt", "text_stride": 9}, b"abc", "eval.text_stride", "exceeds seq_length 8"),
    ({"text_stride": 4}, b"abc", "eval.text_stride", "[eval] text, which is not set"),
])
def test_eval_text_checked_at_validate(tmp_path, keys, content, key, words):
    from suite.scenario import load_scenario

    (tmp_path / "test.txt").write_bytes(content)
    lines = "".join(f'{k} = {json.dumps(v)}\n' for k, v in keys.items())
    (tmp_path / "s.toml").write_text('[model]\npreset = "tiny"\n[workload]\nkind = "accuracy"\nseq_length = 8\n'
                                     '[data]\nsource = "text"\npath = "builtin:shakespeare"\n[eval]\n' + lines)
    with pytest.raises(UserError) as e:
        load_scenario(tmp_path / "s.toml")
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_eval_text_belongs_to_the_accuracy_workload(tmp_path):
    from suite.scenario import load_scenario

    (tmp_path / "test.txt").write_text("some text")
    (tmp_path / "s.toml").write_text('[model]\npreset = "tiny"\n[eval]\ntext = "test.txt"\n')
    with pytest.raises(UserError) as e:
        load_scenario(tmp_path / "s.toml")
    assert e.value.key == "eval.text" and 'kind = "accuracy"' in e.value.fix


@pytest.mark.slow
def test_accuracy_workload_scores_a_text_file_like_transformers(tmp_path, monkeypatch):
    """`suite run` of an accuracy scenario: a random transformers LLaMA (hf: init) with its own BPE
    tokenizer (hf: folder, BOS <s>) scores [eval] text in windows of 16 moved by 8; the record's
    perplexity and bits per byte equal the same windows scored by transformers itself."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from check_worker import run_suite

    corpus = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. ") * 40
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf_tok.save_pretrained(tmp_path / "tok")
    vocab = len(hf_tok)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(tmp_path / "model")
    text = "A lazy dog, a quick fox: five dozen jugs — and a box (déjà vu). " * 2
    (tmp_path / "test.txt").write_text(text, encoding="utf-8")
    (tmp_path / "corpus.txt").write_text(corpus)
    (tmp_path / "s.toml").write_text(f"""
name = "eval_text"
[model]
num_layers = 2
hidden_size = 64
num_attention_heads = 4
num_query_groups = 2
ffn_hidden_size = 128
vocab_size = {vocab}
max_sequence_length = 64
norm_epsilon = 1e-6
init = "hf:model"
[workload]
kind = "accuracy"
seq_length = 16
precision = "fp32"
[data]
source = "text"
path = "corpus.txt"
tokenizer = "hf:tok"
[eval]
heldout_max_tokens = 32
text = "test.txt"
text_stride = 8
""")
    monkeypatch.setenv("SUITE_CACHE", str(tmp_path / "cache"))
    r = run_suite("run", tmp_path / "s.toml", "--out", tmp_path / "out", timeout_s=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    got = record["metrics"]["accuracy"]["original"]["text"]

    # the oracle: BOS, then every token scored once; the first window scores 16, each later one the next
    # 8 with the 16 tokens before its last as inputs
    ids = [hf_tok.bos_token_id] + hf_tok.encode(text, add_special_tokens=False)
    assert len(ids) > 40  # several windows
    ll, end = 0.0, 0
    while end < len(ids) - 1:
        new_end = min(len(ids) - 1, 16 if end == 0 else end + 8)  # last scored position
        start = max(0, new_end - 16)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[start:new_end]])).logits[0].double(), -1)
        for t in range(end + 1, new_end + 1):
            ll += float(logp[t - 1 - start, ids[t]])
        end = new_end
    n = len(ids) - 1
    assert (got["tokens"], got["bytes"], got["stride"], got["seq_length"]) == (n, len(text.encode()), 8, 16)
    assert got["loss"] == pytest.approx(-ll / n, rel=1e-5)
    assert got["bpb"] == pytest.approx(-ll / (len(text.encode()) * math.log(2)), rel=1e-5)
