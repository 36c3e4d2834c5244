"""Model checkpoints through megatron-core's distributed checkpointing, and ``[model] init``.

A checkpoint is a directory in megatron's ``torch_dist`` format (``torch.distributed.checkpoint``
underneath): every parameter is stored once under its global key and global shape, from the
``sharded_state_dict()`` of this rank's model chunks, so a model saved at one TP/PP layout loads at any
other (megatron reshards on load, including the [q k v]-per-group and [gate; up] fusions). ``common.pt``
also holds the model's shape (``suite_model``), which is checked against the scenario before loading.

Saving is synchronous (``_SyncTorchDistSave``): megatron's default torch_dist writer forks writer
processes and spawns a multiprocessing Manager on every save (4.5 s for the tiny model on CPU), and
when ``psutil`` is missing its writer process dies and the save waits forever. The synchronous
writer produces the same format, which megatron's default load strategy reads.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from suite.errors import UserError
from suite.models import gpt

# Scenario [model] keys that fix the parameters' shapes and the function the model computes.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "vocab_size", "rope_base", "norm_epsilon")


class _SyncTorchDistSave(TorchDistSaveShardedStrategy):
    """megatron's torch_dist format, written by ``torch.distributed.checkpoint.save`` in this process."""

    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir):
        # the same translation megatron's async_save does: one main replica per shard, PyT ShardedTensors
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp.save(mcore_to_pyt_state_dict(state, False),
                 storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DistributedDataParallel / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _sharded_state_dict(chunks) -> dict:
    # one entry per chunk: keys inside are local, the ShardedTensors carry global keys
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def model_shape(spec) -> dict:
    return {k: getattr(spec.model, k) for k in SHAPE_KEYS}


def resolve(spec, path: str) -> Path:
    """A path from the scenario, relative to the scenario file."""
    return (Path(spec.file).parent / Path(path).expanduser()).resolve()


def is_checkpoint(path: Path) -> bool:
    return (path / "metadata.json").is_file() and (path / "common.pt").is_file()


def saved_architecture(path: Path) -> dict:
    """The checkpoint's ``gpt.architecture`` ({} when absent: plain LLaMA, or not a checkpoint, which
    ``load`` reports)."""
    if not is_checkpoint(path):
        return {}
    return dict(dist_checkpointing.load_common_state_dict(str(path)).get("suite_architecture") or {})


def check_shape(spec, saved: dict, path: Path) -> None:
    """UserError naming the first [model] key whose value differs from the checkpoint's."""
    wrong = [k for k in SHAPE_KEYS if k in saved and saved[k] != getattr(spec.model, k)]
    if wrong:
        k = wrong[0]
        raise UserError(f"{k} is {getattr(spec.model, k)} but the checkpoint {path} was saved with {saved[k]}.",
                        file=spec.file, variant=spec.name, key=f"model.{k}",
                        fix="set in [model]: " + ", ".join(f"{w} = {saved[w]!r}" for w in wrong) + ".")


def check_save_path(spec) -> Path | None:
    """The save_checkpoint directory; UserError when it holds something other than a checkpoint."""
    if not spec.workload.save_checkpoint:
        return None
    path = resolve(spec, spec.workload.save_checkpoint)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not is_checkpoint(path))):
        raise UserError(f"{path} exists and is not a checkpoint; suite only replaces earlier checkpoints.",
                        file=spec.file, variant=spec.name, key="workload.save_checkpoint",
                        fix="give a new or empty directory, or remove that one.")
    return path


def save(spec, chunks, log=print) -> Path:
    """Saves this rank's model chunks (collective: every rank calls it) to ``workload.save_checkpoint``."""
    path = check_save_path(spec)
    dist.barrier()  # every rank has checked before rank 0 touches the directory
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)  # an earlier checkpoint (check_save_path refuses anything else)
        path.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state_dict(chunks)
    state["suite_model"] = model_shape(spec)  # plain values go to common.pt
    state["suite_architecture"] = gpt.architecture(spec)  # q/k/v biases, RoPE scaling: needed to rebuild
    dist_checkpointing.save(state, str(path), sharded_strategy=_SyncTorchDistSave())
    log(f"checkpoint saved to {path}")
    return path


def load(spec, chunks, path: Path, log=print) -> None:
    """Loads a checkpoint saved at any TP/PP layout into this rank's chunks (collective)."""
    if not is_checkpoint(path):
        raise UserError(f"no checkpoint at {path} (expected metadata.json and common.pt).",
                        file=spec.file, variant=spec.name, key="model.init",
                        fix="give the directory a variant wrote with [workload] save_checkpoint, "
                            "relative to the scenario file.")
    saved = dist_checkpointing.load_common_state_dict(str(path)).get("suite_model", {})
    check_shape(spec, saved, path)
    models = [_unwrap(c) for c in chunks]
    # megatron checks (collectively) that every shard has one main replica among the ranks; a parallel
    # mode's ranks (e.g. megatron's DP ranks) may each build some layers only, whose single copy is not on DP rank 0. Each
    # rank still reads exactly its own tensors. Every rank must take the same branch.
    positions = [_positions(m) for m in models]
    subset = [None] * dist.get_world_size()
    dist.all_gather_object(subset, any(positions))
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(path),
                                    validate_access_integrity=not any(subset))
    for i, (model, position) in enumerate(zip(models, positions)):
        model.load_state_dict(_by_list_position(state[f"model{i}"], position), strict=True)
    log(f"weights loaded from checkpoint {path}")


def _positions(model) -> dict[int, int] | None:
    """megatron keys a layer's loaded entries by its layer number minus the stage's offset: its position
    in the layer list when the stage builds all of its layers. A parallel mode's rank may build a subset,
    each layer keeping its global number: {key number: list position}, None if equal."""
    decoder = model.decoder
    offset = get_transformer_layer_offset(decoder.config, decoder.vp_stage)
    position = {layer.layer_number - 1 - offset: i for i, layer in enumerate(decoder.layers)}
    return None if all(k == i for k, i in position.items()) else position


def _by_list_position(state: dict, position: dict[int, int] | None) -> dict:
    """``state`` with layer keys renamed to list positions (``_positions``; None: as they are)."""
    if position is None:
        return state
    renamed = {}
    for key, value in state.items():
        m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
        renamed[f"decoder.layers.{position[int(m[1])]}.{m[2]}" if m else key] = value
    return renamed


def apply_init(spec, chunks, log=print) -> None:
    """Applies ``[model] init`` to freshly initialised chunks ('random' keeps them as they are).

    Also checks ``[workload] save_checkpoint`` now, so a bad destination fails before training.
    """
    kind, _, where = spec.model.init.partition(":")
    if kind == "checkpoint":
        load(spec, chunks, resolve(spec, where), log)
    elif kind == "hf":
        from suite.models import hf_import

        hf_import.load(spec, chunks, resolve(spec, where), log)
    check_save_path(spec)
