"""lm-evaluation-harness's ``LM`` interface over a suite.eval model, so that lm-eval's own tasks
(HellaSwag, PIQA, ARC, WinoGrande, ...) score a suite model::

    import lm_eval
    from suite.eval.lm_eval_adapter import SuiteLM
    lm = SuiteLM(MegatronLM(...), ByteTokenizer(), max_length=spec.model.max_sequence_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

Requests are batched: every ``loglikelihood`` request of a task (and every rolling window of its
``loglikelihood_rolling`` requests) goes through ``suite.eval.core.score`` in batches of ``batch_size``
windows of similar length. A task of one's own is a YAML file over local JSON-lines files (see
suite.eval.local_tasks writes one), passed with ``lm_eval.tasks.TaskManager(include_path=FOLDER)``.

Importable only when lm_eval is installed (``pip install lm-eval``; in the dev extras). The tokenizer needs
``encode(str) -> ids`` without special tokens, ``decode(ids) -> str`` and ``bos_token_id`` /
``eos_token_id`` (None when absent). A multi-process megatron model is SPMD: run the same evaluation
on every rank and keep rank 0's results.
"""
from __future__ import annotations

from lm_eval.api.model import LM

from suite.eval.core import greedy_generate, loglikelihoods, rolling_loglikelihoods


class SuiteLM(LM):
    def __init__(self, model, tokenizer, max_length: int = 2048, batch_size: int = 16, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return loglikelihoods(self.model, self.tokenizer, [r.args for r in requests], self.max_length,
                              self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        # lm-eval conditions the first token on a BOS/EOT prefix; without one it is context only
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id
        texts = [self.tokenizer.encode(r.args[0]) for r in requests]
        return [ll for ll, _ in rolling_loglikelihoods(self.model, texts, self.max_length, prefix, self.batch_size)]

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            if kwargs.get("do_sample"):
                raise ValueError("SuiteLM generates greedily; this task asks for sampling (do_sample = true).")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out.append(greedy_generate(self.model, self.tokenizer, context, until,
                                       kwargs.get("max_gen_toks", self.max_gen_toks), self.max_length))
        return out
