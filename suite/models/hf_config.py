"""A Hugging Face checkpoint's config.json against this suite's model: what it maps to in [model], what
it needs beyond it (``architecture``), and what suite's model cannot compute (refused by key).

No torch here: ``suite validate`` runs these checks for ``[model] init = "hf:PATH"`` before any process
starts, and ``suite.models.hf_import`` runs them again when it loads the weights.

What the weights compute is decided by config.json as much as by the tensors, so every key of it is
either mapped, checked (refused with the reason and what would import instead), or known not to change
the function (``NEUTRAL``); an unknown key is refused by name rather than ignored.
"""
from __future__ import annotations

import json
from pathlib import Path

from suite.errors import UserError

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


REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def read_config(spec, path: Path) -> dict:
    """config.json as a dict; UserError when it cannot be read or lacks the sizes every family states."""
    where = dict(file=spec.file, variant=spec.name, key="model.init")
    fix = "point hf:PATH (relative to the scenario file) at a directory written by save_pretrained()."
    try:
        cfg = json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"cannot read {path / 'config.json'} ({e}).", **where, fix=fix) from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path / 'config.json'} is not a JSON object.", **where, fix=fix)
    for key in REQUIRED + ("num_key_value_heads",):
        value = cfg.get(key)
        if (key in REQUIRED or value is not None) and (type(value) is not int or value < 1):
            raise UserError(f"{path / 'config.json'}: {key} is {value!r}, not a positive integer.", **where,
                            fix=fix)
    return cfg


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
    try:
        _check_config(spec, cfg, path)
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type (hand-edited files)
        raise UserError(f"{path / 'config.json'} has a value of the wrong type ({type(e).__name__}: {e}).",
                        file=spec.file, variant=spec.name, key="model.init",
                        fix="write config.json with save_pretrained(), or fix that value.") from None


def _check_config(spec, cfg: dict, path: Path) -> None:
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


def check_folder(spec) -> None:
    """``suite validate``'s check of ``[model] init = "hf:PATH"``: config.json readable and importable
    into the scenario's [model] (the safetensors are read when the weights load)."""
    where = spec.model.init.split(":", 1)[1]
    path = (Path(spec.file).parent / Path(where).expanduser()).resolve()
    check_config(spec, read_config(spec, path), path)
