"""Early exit's torch side: two forward hooks on each built model chunk (public torch hooks; megatron-core's
own final norm, LM head and loss). See the package docstring."""
from __future__ import annotations

import torch

from suite.metrics import flops as F
from suite.metrics.declare import measure
from suite.registry import TrickRuntime
from suite.tricks.early_exit import EXIT_LOSS, step_flops


class EarlyExitRuntime(TrickRuntime):
    def __init__(self, spec, cfg):
        self.cfg, self.shape = cfg, F.Shape.of(spec.model)
        self.B, self.S = spec.workload.global_batch, spec.workload.seq_length
        self.valid: list[float] = []  # the exit's mean loss per micro-batch of the current validation pass

    def attach(self, chunks) -> None:
        for model in chunks:
            holder = {}

            def keep(layer, args, output, holder=holder):
                holder["hidden"] = output[0] if isinstance(output, tuple) else output

            def add_exit(model, args, kwargs, output, holder=holder):
                labels, hidden = kwargs.get("labels"), holder.pop("hidden", None)
                if labels is None or hidden is None:
                    return None
                logits, _ = model.output_layer(model.decoder.final_layernorm(hidden))
                exit_loss = model.compute_language_model_loss(labels, logits)
                if not model.training:  # validation: record the exit, return the model's own loss
                    self.valid.append(float(exit_loss.detach().float().mean()))
                    return None
                # the gradient gains weight x the exit's; the value stays the final loss (compared with the baseline)
                term = self.cfg.weight * exit_loss.to(output.dtype)
                return output + (term - term.detach())

            model.decoder.layers[self.cfg.layer - 1].register_forward_hook(keep)
            model.register_forward_hook(add_exit, with_kwargs=True)

    def begin_step(self, step: int) -> None:
        self.valid = []  # a validation pass follows a training step: keep the latest pass only

    def step_flops(self, step: int) -> int:
        return step_flops(self.shape, self.B, self.S)

    def _loss(self) -> float | None:
        return sum(self.valid) / len(self.valid) if self.valid else None  # micro-batches of equal size

    def extra(self) -> dict:
        return {"layer": self.cfg.layer, "weight": self.cfg.weight, "validation_exit_loss": self._loss()}

    def measures(self) -> list[dict]:
        return [measure(EXIT_LOSS, self._loss(), self.valid)] if self.valid else []  # the layer: metrics.extra
