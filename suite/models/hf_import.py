"""Hugging Face LLaMA, Llama 3.x, Mistral and Qwen2/2.5 weights (a local directory: config.json +
safetensors) -> this suite's megatron-core GPTModel, sharded for the current TP/PP layout.

Each megatron parameter is built as its *full* tensor from the HF tensors, then cut to this rank's
shard the same way ``gpt.init_parameters`` cuts its random tensors (so TP/PP need no special case):

* ``linear_qkv``: megatron's grouped layout, per query group [q heads of the group; k; v], from
  ``q_proj`` / ``k_proj`` / ``v_proj`` (HF's query head j*rep + r uses key/value head j, as megatron's
  group j does), GQA included;
* ``linear_fc1``: [gate; up] from ``gate_proj`` / ``up_proj`` (per TP rank [gate_r; up_r], by ``gpt.shard``);
* Qwen2's q/k/v biases -> ``linear_qkv.bias`` (megatron-core's ``add_qkv_bias``), fused like the weights;
* norms: ``input_layernorm`` -> ``input_layernorm``, ``post_attention_layernorm`` -> ``pre_mlp_layernorm``,
  ``model.norm`` -> ``final_layernorm``; RMSNorm eps and the RoPE base come from the scenario, which
  must match ``rms_norm_eps`` / ``rope_theta`` exactly (a float: 5e5, or 1e6 for Qwen2);
* llama3 RoPE scaling (Llama 3.1/3.2/3.3) -> megatron-core's ``rope_scaling`` / ``rope_scaling_factor``
  (the factor is mapped; megatron fixes low/high frequency factors 1 and 4 and the original context
  8192, so other values are refused);
* embeddings stay untied (a tied HF model's embedding is copied into the output layer); the vocabulary
  is padded to suite's multiple of 128 with zero rows, whose logits are therefore exactly 0
  (``suite.eval`` scores over the real vocabulary only).

What the weights compute is decided by config.json as much as by the tensors, so every key of it is
either mapped, checked (refused with the reason and what would import instead), or known not to change
the function; an unknown key is refused by name rather than ignored (``suite.models.hf_config``, which
``suite validate`` also runs). Mistral's and
Qwen2's sliding-window attention is accepted when the window is at least max_sequence_length (it then
masks nothing) and refused otherwise. The choices [model] cannot express (q/k/v biases, RoPE scaling)
reach the megatron model through ``gpt.architecture``, which reads them from the checkpoint.

RoPE: HF LLaMA rotates the two halves of each head (``rotate_half``, q/k weights permuted at
conversion from Meta's interleaved layout), which is megatron-core's default (rotary_interleaved
False), so q/k need no permutation here; tests/test_hf_import.py checks the logits against
transformers' own forward.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from suite.errors import UserError
from suite.metrics.flops import padded_vocab
from suite.models import gpt

from suite.models.hf_config import (LLAMA3_FIXED, architecture, check_config, read_config,  # noqa: F401
                                    rope_theta, scenario_model)


class _Tensors:
    """Lazy access to the tensors of model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, spec, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise UserError(f"no model.safetensors or model.safetensors.index.json in {path}.",
                            file=spec.file, variant=spec.name, key="model.init",
                            fix="save the model with save_pretrained() (safetensors is its default).")
        self.path, self.weight_map, self._open = path, weight_map, safe_open

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __getitem__(self, name: str) -> torch.Tensor:
        with self._open(self.path / self.weight_map[name], framework="pt") as f:
            return f.get_tensor(name).float()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v projections -> megatron's [q of group 0; k0; v0; q of group 1; ...] rows."""
    hidden = q.shape[1]
    q = q.reshape(groups, -1, hidden)
    k, v = k.reshape(groups, -1, hidden), v.reshape(groups, -1, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def tied(cfg: dict, hf) -> bool:
    """Whether the output layer is the embedding: tie_word_embeddings (False by default in these
    families' configs), or no lm_head.weight saved at all (save_pretrained drops a tied one)."""
    return bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in hf


def full_tensor(gname: str, hf: _Tensors, cfg: dict) -> torch.Tensor:
    """The full (unsharded) megatron tensor for a global parameter name."""
    vocab = padded_vocab(cfg["vocab_size"])
    if gname == "embedding.word_embeddings.weight":
        return _pad_rows(hf["model.embed_tokens.weight"], vocab)
    if gname == "output_layer.weight":
        return _pad_rows(hf["model.embed_tokens.weight" if tied(cfg, hf) else "lm_head.weight"], vocab)
    if gname == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    layer, rest = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", gname).groups()
    p = f"model.layers.{layer}."
    if rest.startswith("self_attention.linear_qkv."):  # weight, or the Qwen2 bias (fused the same way)
        kind = rest.rsplit(".", 1)[1]
        groups = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        q, k, v = (hf[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv")
        if kind == "bias":
            return fuse_qkv(q[:, None], k[:, None], v[:, None], groups)[:, 0]
        return fuse_qkv(q, k, v, groups)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    names = {"input_layernorm.weight": "input_layernorm.weight",
             "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
             "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
             "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
    return hf[p + names[rest]]


@torch.no_grad()
def load(spec, chunks, path: Path, log=print) -> None:
    """Copies the HF checkpoint at ``path`` into this rank's chunks (each rank reads only its tensors)."""
    cfg = read_config(spec, path)
    check_config(spec, cfg, path)
    hf = _Tensors(spec, path)
    tp = ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        names, dims = gpt.global_names(chunk), gpt.partition_dims(chunk)
        for name, param in chunk.named_parameters():
            full = full_tensor(names[name], hf, cfg)
            dim = dims.get(name)
            shard = full if dim is None or tp == 1 else gpt.shard(full, dim, names[name])
            if shard.shape != param.shape:  # a bug, not a user error: the shapes were checked above
                raise RuntimeError(f"{names[name]}: converted shape {tuple(shard.shape)} != {tuple(param.shape)}")
            param.copy_(shard)
    vocab = cfg["vocab_size"]
    pad = padded_vocab(vocab) - vocab
    log(f"weights imported from Hugging Face checkpoint {path}"
        + (f"; vocab {vocab} padded to {vocab + pad} with {pad} zero rows (logit 0; suite.eval scores only "
           f"the first {vocab})" if pad else "")
        + ("; tied embeddings copied into the untied output layer" if tied(cfg, hf) else ""))
