"""``suite export-hf``: one process builds a variant's model at TP = PP = 1 (a checkpoint saved at any
layout loads resharded), applies ``[model] init`` and writes it as a Hugging Face folder
(``suite.models.hf_export``)."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from suite.errors import UserError
from suite.launch import cpu_compat
from suite.models.build import build
from suite.models.hf_export import check_output, export
from suite.scenario import load_scenario
from suite.scenario.schema import ParallelConfig


def export_command(args) -> int:
    """``suite export-hf``: one process builds the variant's model at TP=PP=1 (a checkpoint saved at any
    layout loads resharded), applies ``[model] init`` and writes the Hugging Face folder."""
    variants = load_scenario(args.scenario, args.overrides, args.variants)
    spec = dataclasses.replace(variants[0], parallel=ParallelConfig())
    if spec.model.init == "random":
        raise UserError("[model] init is random: there are no trained weights to export.", file=spec.file,
                        variant=spec.name, key="model.init",
                        fix='set init = "checkpoint:PATH" (a [workload] save_checkpoint folder) or "hf:PATH".')
    check_output(spec, args.output)  # before the model is built
    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.enable()
    store = tempfile.NamedTemporaryFile(prefix="suite_export_", delete=False).name
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel()
        chunks = build(spec, log=lambda message: print(f"[suite] {message}")).chunks
        export(spec, chunks, Path(args.output), args.dtype, log=lambda message: print(f"[suite] {message}"))
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        os.unlink(store)
    return 0
