"""Hugging Face LLaMA-family weights (a local directory: config.json + safetensors) -> this suite's
megatron-core GPTModel, sharded for the current TP/PP layout.

Each megatron parameter is built as its *full* tensor from the HF tensors, then cut to this rank's
shard the same way ``gpt.init_parameters`` cuts its random tensors (so TP/PP need no special case):

* ``linear_qkv``: megatron's grouped layout, per query group [q heads of the group; k; v], from
  ``q_proj`` / ``k_proj`` / ``v_proj`` (HF's query head j*rep + r uses key/value head j, as megatron's
  group j does), GQA included;
* ``linear_fc1``: [gate; up] from ``gate_proj`` / ``up_proj`` (per TP rank [gate_r; up_r], by ``gpt.shard``);
* norms: ``input_layernorm`` -> ``input_layernorm``, ``post_attention_layernorm`` -> ``pre_mlp_layernorm``,
  ``model.norm`` -> ``final_layernorm``; RMSNorm eps and the RoPE base come from the scenario, which
  must match ``rms_norm_eps`` / ``rope_theta``;
* embeddings stay untied (a tied HF model's embedding is copied into the output layer); the vocabulary
  is padded to suite's multiple of 128 with zero rows, whose logits are therefore exactly 0
  (``suite.eval`` scores over the real vocabulary only).

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

FAMILY = ("llama", "mistral")


def read_config(spec, path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / 'config.json'} ({e}).", file=spec.file, variant=spec.name,
                        key="model.init", fix="point hf:PATH (relative to the scenario file) at a directory "
                        "written by save_pretrained().") from None


def rope_theta(cfg: dict) -> float:
    # transformers >= 5 nests it in rope_parameters; older configs have it at the top level
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def scenario_model(cfg: dict) -> dict:
    """The [model] keys that describe this HF config (what the scenario must say)."""
    return {
        "num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_query_groups": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "ffn_hidden_size": cfg["intermediate_size"], "vocab_size": cfg["vocab_size"],
        "rope_base": rope_theta(cfg), "norm_epsilon": cfg.get("rms_norm_eps", 1e-6),
    }


def _unsupported(cfg: dict, spec) -> str | None:
    """Why this checkpoint's architecture differs from suite's LLaMA block, or None."""
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    window = cfg.get("sliding_window")
    if cfg.get("model_type") not in FAMILY:
        return f"model_type '{cfg.get('model_type')}' is not one of {', '.join(FAMILY)}"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act '{cfg['hidden_act']}' is not silu (SwiGLU)"
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        return "it has biases in attention or MLP"
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        return f"head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads"
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"it uses RoPE scaling '{rope.get('rope_type', rope.get('type'))}'"
    if window is not None and window < spec.model.max_sequence_length:
        return f"sliding-window attention ({window} tokens) is shorter than max_sequence_length"
    return None


def check_config(spec, cfg: dict, path: Path) -> None:
    """UserError when the scenario's [model] differs from the HF config, naming the first key."""
    where = dict(file=spec.file, variant=spec.name)
    why = _unsupported(cfg, spec)
    if why:
        raise UserError(f"{path} cannot be imported: {why}.", key="model.init", **where,
                        fix="use a LLaMA-style checkpoint (RMSNorm, SwiGLU, RoPE, no biases).")
    want = scenario_model(cfg)
    wrong = [k for k, v in want.items() if getattr(spec.model, k) != v]
    if wrong:
        k = wrong[0]
        raise UserError(f"{k} is {getattr(spec.model, k)} but {path / 'config.json'} says {want[k]}.",
                        key=f"model.{k}", **where,
                        fix="set in [model]: " + ", ".join(f"{w} = {want[w]!r}" for w in wrong) + ".")
    most = cfg.get("max_position_embeddings")
    if most is not None and spec.model.max_sequence_length > most:
        raise UserError(f"max_sequence_length {spec.model.max_sequence_length} exceeds the "
                        f"checkpoint's max_position_embeddings {most}.", key="model.max_sequence_length",
                        **where, fix=f"set max_sequence_length <= {most}.")


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


def full_tensor(gname: str, hf: _Tensors, cfg: dict) -> torch.Tensor:
    """The full (unsharded) megatron tensor for a global parameter name."""
    vocab = padded_vocab(cfg["vocab_size"])
    if gname == "embedding.word_embeddings.weight":
        return _pad_rows(hf["model.embed_tokens.weight"], vocab)
    if gname == "output_layer.weight":
        tied = "lm_head.weight" not in hf  # save_pretrained drops lm_head when it is tied
        return _pad_rows(hf["model.embed_tokens.weight" if tied else "lm_head.weight"], vocab)
    if gname == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    layer, rest = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", gname).groups()
    p = f"model.layers.{layer}."
    if rest == "self_attention.linear_qkv.weight":
        groups = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return fuse_qkv(hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
                        hf[p + "self_attn.v_proj.weight"], groups)
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
        + ("; tied embeddings copied into the untied output layer" if "lm_head.weight" not in hf else ""))
