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
the function (``NEUTRAL``); an unknown key is refused by name rather than ignored. Mistral's and
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

FAMILY = ("llama", "mistral", "qwen2")

# megatron-core's llama3 RoPE scaling (RotaryEmbedding._apply_scaling) takes only the factor; the
# other three parameters are fixed at the values every Llama 3.1/3.2/3.3 checkpoint uses.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# config.json keys that do not change the function the weights compute: bookkeeping, generation
# defaults, token ids (the tokenizer's business), initialisation and dropout (evaluation runs without
# it; suite trains without it). Every other key is mapped, checked, or refused by name.
NEUTRAL = {
    "transformers_version", "architectures", "_name_or_path", "model_type", "dtype", "torch_dtype",
    "use_cache", "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "id2label",
    "label2id", "problem_type", "finetuning_task", "prefix", "task_specific_params", "tokenizer_class",
    "use_bfloat16", "torchscript", "tf_legacy_loss", "pruned_heads", "tie_encoder_decoder", "attention_dropout",
    "pretraining_tp",  # HF's tensor-parallel emulation: the same products, summed in slices
    "max_position_embeddings",  # checked against max_sequence_length
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",  # mapped
    "tie_word_embeddings",  # tied: the embedding is copied into suite's untied output layer
    "hidden_act", "head_dim", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types",  # checked in _unsupported
}
SUPPORTED = "LLaMA, Mistral and Qwen2/2.5 (RMSNorm, SwiGLU, RoPE, grouped-query attention)"


def read_config(spec, path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path / 'config.json'} ({e}).", file=spec.file, variant=spec.name,
                        key="model.init", fix="point hf:PATH (relative to the scenario file) at a directory "
                        "written by save_pretrained().") from None


def rope(cfg: dict) -> dict:
    """The RoPE parameters in one dict, from either config format: transformers >= 5 nests them all in
    ``rope_parameters``; older configs have ``rope_theta`` at the top level and ``rope_scaling``."""
    scaling, nested = cfg.get("rope_scaling") or {}, cfg.get("rope_parameters") or {}
    params = {**scaling, **nested}
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    kinds = [d.get("rope_type", d.get("type")) for d in (nested, scaling)]  # any scaling, in either place
    params["rope_type"] = next((k for k in kinds if k not in (None, "default")), "default")
    return params


def rope_theta(cfg: dict) -> float:
    return float(rope(cfg)["rope_theta"])


def architecture(cfg: dict) -> dict:
    """What the checkpoint needs of the megatron model beyond [model]'s keys (``gpt.architecture``):
    q/k/v biases (Qwen2) and the llama3 RoPE scaling factor (None: no scaling)."""
    r = rope(cfg)
    return {"qkv_bias": cfg.get("model_type") == "qwen2",
            "rope_scaling_factor": float(r["factor"]) if r["rope_type"] == "llama3" else None}


def scenario_model(cfg: dict) -> dict:
    """The [model] keys that describe this HF config (what the scenario must say)."""
    return {
        "num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_query_groups": cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        "ffn_hidden_size": cfg["intermediate_size"], "vocab_size": cfg["vocab_size"],
        "rope_base": rope_theta(cfg), "norm_epsilon": cfg.get("rms_norm_eps", 1e-6),
    }


def windowed_layers(cfg: dict) -> list[int]:
    """The layers transformers runs with sliding-window attention."""
    n = cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        return [i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention"]
    if cfg.get("sliding_window") is None:
        return []
    if cfg.get("model_type") == "qwen2":  # Qwen2: only with use_sliding_window, from max_window_layers on
        return list(range(cfg.get("max_window_layers", n), n)) if cfg.get("use_sliding_window") else []
    return list(range(n))  # Mistral: every layer


def _unsupported(cfg: dict, spec) -> tuple[str, str, str] | None:
    """(config key, why the checkpoint differs from what suite's model computes, what would work), or None."""
    heads, kind = cfg["num_attention_heads"], cfg.get("model_type")
    r = rope(cfg)
    if kind not in FAMILY:
        return ("model_type", f"model_type '{kind}' is not one of {', '.join(FAMILY)}",
                f"import a checkpoint of {SUPPORTED}; evaluate other architectures with their own tools "
                "(e.g. lm-eval's hf model).")
    unknown = sorted(k for k in cfg if k not in NEUTRAL and not k.startswith("_"))
    if unknown:
        return (unknown[0], f"config key '{unknown[0]}' is unknown to this importer, so the function it "
                "may change would be lost",
                f"if '{unknown[0]}' does not change the forward pass, delete it from a copy of config.json "
                "(weights can be symlinked); if it does, this checkpoint is not supported.")
    if cfg.get("hidden_act", "silu") != "silu":
        return ("hidden_act", f"hidden_act '{cfg['hidden_act']}' is not silu (SwiGLU)",
                "import a checkpoint with a SwiGLU MLP (hidden_act silu).")
    if cfg.get("attention_bias"):
        return ("attention_bias", "attention_bias is true: biases on q/k/v and o_proj; megatron-core's "
                "add_qkv_bias covers q/k/v only", "checkpoints with q/k/v biases alone import as model_type "
                "qwen2; an o_proj bias has no place in suite's model.")
    if cfg.get("mlp_bias"):
        return ("mlp_bias", "mlp_bias is true: suite's SwiGLU MLP has no biases",
                "import a checkpoint with mlp_bias false.")
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        return ("head_dim", f"head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads "
                f"({cfg['hidden_size'] // heads}); [model] has no separate head size",
                "import a checkpoint whose head_dim is hidden_size / num_attention_heads.")
    if r["rope_type"] not in ("default", "llama3"):
        return ("rope_scaling", f"it uses RoPE scaling '{r['rope_type']}' (megatron-core's RoPE maps only "
                "llama3 scaling)", "import a checkpoint without RoPE scaling or with llama3 scaling "
                "(Llama 3.1/3.2/3.3).")
    if r["rope_type"] == "llama3":
        for key, value in LLAMA3_FIXED.items():
            if float(r.get(key, value)) != value:
                return (f"rope_scaling.{key}", f"llama3 RoPE scaling with {key} {r[key]}; megatron-core's "
                        f"llama3 scaling fixes it at {value:g}",
                        f"only llama3 scaling with " + ", ".join(f"{k} {v:g}" for k, v in LLAMA3_FIXED.items())
                        + " (every Llama 3.1/3.2/3.3 checkpoint) imports.")
    if cfg.get("layer_types") and set(cfg["layer_types"]) - {"full_attention", "sliding_attention"}:
        return ("layer_types", f"layer_types {sorted(set(cfg['layer_types']))} include attention other than "
                "full or sliding-window causal", "import a checkpoint whose layers all use causal attention.")
    window = cfg.get("sliding_window")
    if windowed_layers(cfg) and window is not None and window < spec.model.max_sequence_length:
        # transformers' window: query i sees keys j with i - j < window, so L <= window masks nothing
        return ("sliding_window", f"sliding-window attention ({window} tokens) is shorter than "
                f"max_sequence_length {spec.model.max_sequence_length}, and suite's attention is full causal",
                f"set [model] max_sequence_length (and seq_length) <= {window}: a window at least as long as "
                "the sequence masks nothing.")
    return None


def check_config(spec, cfg: dict, path: Path) -> None:
    """UserError when the checkpoint computes something suite's model cannot, or the scenario's [model]
    differs from the HF config, naming the first key."""
    where = dict(file=spec.file, variant=spec.name)
    bad = _unsupported(cfg, spec)
    if bad:
        key, why, fix = bad
        raise UserError(f"{path} cannot be imported ({path / 'config.json'}: {key}): {why}.", key="model.init",
                        **where, fix=fix)
    want = scenario_model(cfg)
    wrong = [k for k, v in want.items() if getattr(spec.model, k) != v]
    if wrong:
        k = wrong[0]
        raise UserError(f"{k} is {getattr(spec.model, k)!r} but {path / 'config.json'} says {want[k]!r}.",
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
