"""A megatron-core GPTModel (this rank's chunks, any TP/PP layout) as a log-prob model for suite.eval.

Every rank calls the model with the same tokens (SPMD, like training) and gets the same log-probs:
one forward-only pass through megatron's schedule (pipeline stages included), the vocab-parallel
logits gathered over TP on the last stage, cut to the real vocabulary (suite pads it to a multiple
of 128; padded rows must not take probability mass) and broadcast to the other pipeline stages. The
interleaved schedule (vpp) needs at least pp micro-batches: the rows are split into pp of them.
Data-parallel replicas each compute the same thing. The full [batch, length, vocab] log-probs are
materialised, so keep ``batch_size`` of the evaluators modest for large vocabularies.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


class MegatronLM:
    def __init__(self, chunks, config, vocab_size: int):
        self.chunks, self.config, self.vocab = list(chunks), config, vocab_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        tp = ps.get_tensor_model_parallel_world_size()
        pad = -length % tp if self.config.sequence_parallel else 0  # sequence parallelism splits the length
        tokens = torch.nn.functional.pad(tokens, (0, pad)).to(self.device or "cpu")
        interleaved = len(self.chunks) > 1
        n = ps.get_pipeline_model_parallel_world_size() if interleaved else 1
        rows = -(-batch // n)  # per micro-batch; zero rows fill the last one
        tokens = torch.nn.functional.pad(tokens, (0, 0, 0, n * rows - batch))
        micro = list(tokens.split(rows))
        result = []

        def forward_step(data_iterator, model):
            x = next(data_iterator)
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand_as(x)
            logits = model(x, positions, None)  # [b, s, vocab / tp] (no labels: logits, not a loss)

            def keep(logits):
                full = gather_from_tensor_model_parallel_region(logits)[..., :self.vocab]
                result.append(torch.log_softmax(full.float(), dim=-1))  # micro-batches in order
                return torch.zeros((), device=logits.device), {}

            return logits, keep

        for chunk in self.chunks:
            chunk.eval()
        data = [iter(micro) for _ in self.chunks] if interleaved else iter(micro)
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=self.chunks,
                                    num_microbatches=n, seq_length=tokens.shape[1], micro_batch_size=rows,
                                    forward_only=True)
        logprobs = torch.cat(result) if result else None
        if ps.get_pipeline_model_parallel_world_size() > 1:
            if logprobs is None:  # not the last stage
                logprobs = torch.empty(len(tokens), tokens.shape[1], self.vocab, device=tokens.device)
            dist.broadcast(logprobs, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return logprobs[:batch, :length]


def build(spec, log=print) -> MegatronLM:
    """The variant's model for evaluation: built for this rank's layout, then ``[model] init`` applied
    (a checkpoint or Hugging Face weights). Needs megatron's parallel_state initialised."""
    from suite.models.build import build

    built = build(spec, log=log)
    return MegatronLM(built.chunks, built.config, spec.model.vocab_size)
