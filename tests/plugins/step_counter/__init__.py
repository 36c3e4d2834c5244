"""An out-of-tree technique: counts the optimizer steps and micro-batches the trainer announces.

``[tricks.step_counter] every = N`` records, in the record's ``metrics.extra.step_counter``, how many
steps and micro-batches the training hooks saw and the steps that were multiples of N. One folder and
one line in ``SUITE_PLUGINS`` are all a technique needs (``tests/test_registry.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from suite import errors
from suite.fields import doc
from suite.registry import Trick, TrickRuntime, register


@dataclass
class StepCounterConfig:
    """[tricks.step_counter]"""

    every: int = doc("Record the steps that are multiples of this.", 2, range="[1, 1000000]")


class StepCounter(TrickRuntime):
    def __init__(self, spec, cfg: StepCounterConfig):
        self.cfg, self.steps, self.microbatches, self.marked = cfg, 0, 0, []

    def begin_step(self, step: int) -> None:
        self.steps += 1
        if step % self.cfg.every == 0:
            self.marked.append(step)

    def begin_microbatch(self, sample_offset: int) -> None:
        self.microbatches += 1

    def extra(self) -> dict:
        return {"steps": self.steps, "microbatches": self.microbatches, "marked": self.marked}


def validate(spec, cfg: StepCounterConfig) -> None:
    if spec.workload.kind != "train":
        errors.fail(spec, "tricks.step_counter", "step_counter counts training steps.",
                    'set [workload] kind = "train".')


register(Trick(name="step_counter", config=StepCounterConfig, validate=validate, runtime=StepCounter))
