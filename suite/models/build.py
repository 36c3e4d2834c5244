"""The one model builder: a variant's model on this rank, ready for a workload.

Every workload and analysis builds its model here, so the sequence is written once and a technique
or parallel mode changes the model in one way only, through the layer spec it hands in:

    layer spec (plug-ins) -> megatron TransformerConfig -> this rank's GPTModel chunks (its TP/PP
    part of the layout megatron's parallel_state holds) -> deterministic init (``gpt.init_parameters``)
    -> ``[model] init`` (a suite checkpoint or Hugging Face weights) -> device and precision
    -> the kernel back-end's compiled layers (``[model] kernels``, ``suite.models.kernels``).

Training wraps the chunks for its optimizer itself (``gpt.wrap_for_training``: Float16Module keeps
fp32 master weights), so the builder casts to bf16 and switches to eval mode only for ``inference``
use. Needs megatron's parallel_state initialised.
"""
from __future__ import annotations

from dataclasses import dataclass

from suite.models import checkpoint, gpt, kernels


@dataclass
class Built:
    """What ``build`` returns: this rank's model chunks and the config they were built with."""

    chunks: list
    config: object  # megatron TransformerConfig

    @property
    def model(self):
        """The single chunk (layouts without virtual pipeline stages)."""
        (model,) = self.chunks
        return model


def build(spec, layer=None, *, log=print, inference: bool = False, compile_layers: bool = True) -> Built:
    """This rank's model for ``spec``: ``layer`` is the megatron layer spec (default: suite's LLaMA-style
    recipe, ``gpt.layer_spec()``); ``inference``: cast to bf16 when the variant asks for it, eval mode;
    ``compile_layers``: False for a caller that compiles its own step (``kernels = "compile"``)."""
    config = gpt.transformer_config(spec)
    if spec.workload.precision == "fp8":  # the one place every workload's layer spec passes
        from suite.models import fp8  # torchao is optional: imported for fp8 variants only

        layer = fp8.layer_spec(spec, layer or gpt.layer_spec())
    chunks = gpt.build_chunks(spec, config, layer)  # placed on this rank's GPU when there is one
    gpt.init_parameters(chunks, spec.workload.seed, spec.model.init_std, spec.model.num_layers)
    checkpoint.apply_init(spec, chunks, log)  # [model] init: a checkpoint or Hugging Face weights
    if inference:
        for chunk in chunks:
            if config.bf16:
                chunk.bfloat16()
            chunk.eval()
    if not inference:
        kernels.fuse_weight_grad_accumulation(spec, chunks)
    if compile_layers:
        kernels.compile_layers(spec, chunks)  # last: compiles the layers as they will run
    return Built(chunks, config)
