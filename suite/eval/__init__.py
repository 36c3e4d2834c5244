"""Accuracy next to speed: held-out loss, perplexity and bits per byte; zero-shot multiple choice.

A *model* here is any callable ``tokens [batch, length] (int64) -> log-probs [batch, length, vocab]``
whose row t is log p(next token | tokens[:t+1]). ``suite.eval.megatron_lm.MegatronLM`` wraps a
megatron-core GPTModel at any TP/PP layout (every rank gets the same log-probs); the tests use a bigram
table. ``suite.eval.lm_eval_adapter`` exposes such a model to lm-evaluation-harness.

Definitions (``suite.eval.metrics``):

* Text: every token after the first is scored once, with as much preceding context as fits in
  ``seq_length`` (lm-evaluation-harness's rolling windows, the first token acting as the prefix).
  ``loss`` = mean negative log-likelihood in nats per scored token, ``perplexity`` = exp(loss),
  ``bpb`` (bits per byte) = loss · tokens / (bytes · ln 2), bytes being the UTF-8 bytes of the scored
  tokens; with the byte tokenizer tokens = bytes, so bpb = loss / ln 2.
* Multiple choice, exactly as lm-evaluation-harness's ``multiple_choice`` tasks: for an example
  ``{"context": c, "choices": [s_0, ...], "label": i}`` each choice's log-likelihood is
  ll_k = Σ log p(continuation tokens | context) with continuation = delimiter + s_k (delimiter " ",
  lm-eval's default ``target_delimiter``; the context/continuation token split is lm-eval's: trailing
  spaces of the context move into the continuation). ``acc`` = 1 if argmax_k ll_k = i;
  ``acc_norm`` = 1 if argmax_k ll_k / len(s_k) = i, len counting the characters of the choice without
  the delimiter (lm-eval's ``completion_len``; characters = bytes for ASCII text). Ties go to the
  first choice (numpy's argmax). Both are averaged over examples, with stderr = sample standard
  deviation / sqrt(n) (lm-eval's ``mean_stderr``).
"""
from suite.eval.core import ByteTokenizer, encode_pair, greedy_generate, loglikelihoods, rolling_loglikelihood
from suite.eval.metrics import Example, multiple_choice, read_examples, text_metrics

__all__ = ["ByteTokenizer", "Example", "encode_pair", "greedy_generate", "loglikelihoods", "multiple_choice",
           "read_examples", "rolling_loglikelihood", "text_metrics"]
