"""This suite's megatron-core GPTModel -> a Hugging Face folder (config.json + safetensors), from any
TP/PP layout, so that a fine-tuned or multi-level-trained model can be evaluated by any tool that reads
``save_pretrained`` folders (transformers, lm-evaluation-harness's ``hf`` model, vLLM, ...).

The inverse of ``suite.models.hf_import``: every parameter is gathered to its full tensor over the TP
ranks (``gpt.unshard``), then split into the HF tensors: ``linear_qkv`` into ``q_proj`` / ``k_proj`` /
``v_proj`` (and their biases) per query group, ``linear_fc1`` into ``gate_proj`` / ``up_proj``, the
vocabulary cut back from suite's padded size. Tensors are not moved between pipeline stages: the TP
rank 0 of each stage (data-parallel rank 0) writes the tensors of its layers to its own safetensors
file and rank 0 writes ``model.safetensors.index.json`` (transformers' sharded format) and config.json.
One stage writes ``model.safetensors``.

The output layer is exported as tied (``tie_word_embeddings``, no ``lm_head.weight``) exactly when it is
bitwise equal to the embedding, so HF -> suite -> HF gives back the same tensors, tied or not.
config.json is the source's (``[model] init = "hf:PATH"``) with the mapped keys rewritten, or else one
written from [model] (``model_type`` llama, or qwen2 when the model has q/k/v biases). What a parallel mode
does at run time (e.g. layers of a group run on one input) is no HF architecture: the export holds the
weights, run sequentially.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from suite.errors import UserError
from suite.models import gpt
from suite.models.checkpoint import _unwrap, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


def split_qkv(fused: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's [q of group 0; k0; v0; q of group 1; ...] rows -> HF q, k, v (inverse of ``fuse_qkv``)."""
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, -1, *rest)
    d = per_group.shape[1] // (heads // groups + 2)
    q, k, v = per_group.split([per_group.shape[1] - 2 * d, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def hf_tensors(gname: str, full: torch.Tensor, spec) -> dict[str, torch.Tensor]:
    """The HF tensors of one full megatron parameter."""
    m = spec.model
    if gname == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": full[:m.vocab_size]}
    if gname == "output_layer.weight":
        return {"lm_head.weight": full[:m.vocab_size]}
    if gname == "decoder.final_layernorm.weight":
        return {"model.norm.weight": full}
    layer, rest = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", gname).groups()
    p = f"model.layers.{layer}."
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = split_qkv(full, m.num_attention_heads, m.num_query_groups)
        return {f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k, f"{p}self_attn.v_proj.{kind}": v}
    if rest == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2, dim=0)
        return {p + "mlp.gate_proj.weight": gate.contiguous(), p + "mlp.up_proj.weight": up.contiguous()}
    names = {"input_layernorm.weight": "input_layernorm.weight",
             "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
             "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
             "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
    return {p + names[rest]: full}


def hf_config(spec, tied: bool, dtype: str) -> dict:
    """config.json: the source checkpoint's with the mapped keys set, or one written from [model]."""
    from suite.models import hf_config

    m, arch = spec.model, gpt.architecture(spec)
    kind, _, where = m.init.partition(":")
    cfg = hf_config.read_config(spec, resolve(spec, where)) if kind == "hf" else {}
    if not cfg:
        qwen = arch["qkv_bias"]
        cfg = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
               "model_type": "qwen2" if qwen else "llama", "hidden_act": "silu",
               "max_position_embeddings": m.max_sequence_length, "rope_theta": float(m.rope_base)}
        cfg.update({"use_sliding_window": False} if qwen else {"attention_bias": False, "mlp_bias": False})
        if arch["rope_scaling_factor"] is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", "factor": arch["rope_scaling_factor"],
                                   **hf_config.LLAMA3_FIXED}
    shape = {"num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size,
             "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_query_groups,
             "intermediate_size": m.ffn_hidden_size, "vocab_size": m.vocab_size, "rms_norm_eps": m.norm_epsilon,
             "head_dim": m.hidden_size // m.num_attention_heads}
    for key, value in shape.items():
        if kind == "hf" and key in cfg and cfg[key] != value:  # hf_config.check_config refused this
            raise RuntimeError(f"{key}: [model] says {value}, the source config {cfg[key]}")
        cfg[key] = value
    cfg.update(tie_word_embeddings=tied, dtype=dtype, torch_dtype=dtype)
    return cfg


def check_output(spec, out) -> Path:
    """``out`` as a Path; UserError when it holds something other than an earlier export."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise UserError(f"{out} exists and is not a Hugging Face folder; export only replaces earlier exports.",
                        file=spec.file, variant=spec.name, fix="give a new or empty directory.")
    return out


def source_dtype(spec) -> str | None:
    """The dtype of the ``hf:`` checkpoint that [model] init loads (None: not one, or not stated)."""
    from suite.models import hf_config

    kind, _, where = spec.model.init.partition(":")
    if kind != "hf":
        return None
    cfg = hf_config.read_config(spec, resolve(spec, where))
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return dtype if dtype in DTYPES else None


def _digest(t: torch.Tensor | None) -> str | None:
    return None if t is None else hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@torch.no_grad()
def export(spec, chunks, out: Path, dtype: str | None = None, log=print) -> Path:
    """Writes this model (this rank's chunks; collective over every rank) as a Hugging Face folder.

    ``dtype``: of the saved tensors; default the source checkpoint's (``hf:`` init) or the model's.
    """
    out = check_output(spec, out)  # every rank, before any collective: a refusal leaves no rank waiting
    models = [_unwrap(c) for c in chunks]
    if dtype is None:
        source = source_dtype(spec)
        dtype = source or ("bfloat16" if next(models[0].parameters()).dtype == torch.bfloat16 else "float32")
    if dtype not in DTYPES:
        raise UserError(f"cannot export in dtype '{dtype}'.", file=spec.file, variant=spec.name,
                        fix=f"use one of {', '.join(DTYPES)}.")
    tensors: dict[str, torch.Tensor] = {}
    for model in models:
        names, dims = gpt.global_names(model), gpt.partition_dims(model)
        for name, param in model.named_parameters():  # same order on every TP rank: unshard is collective
            dim = dims.get(name)
            full = param.detach().clone() if dim is None else gpt.unshard(param.detach(), dim, names[name])
            for key, t in hf_tensors(names[name], full.float(), spec).items():
                tensors[key] = t.to(DTYPES[dtype]).cpu().contiguous()
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    # tied iff the output layer is bitwise the embedding (they live on the first and last stages)
    mine = (_digest(tensors.get("model.embed_tokens.weight")), _digest(tensors.get("lm_head.weight")))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine if writer else (None, None))
    embed = next(e for e, _ in every if e is not None)
    head = next(h for _, h in every if h is not None)
    tied = embed == head
    if tied:
        tensors.pop("lm_head.weight", None)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("model*.safetensors*"):
            old.unlink()
    dist.barrier()
    file = "model.safetensors" if pp == 1 else f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"
    if writer:
        from safetensors.torch import save_file

        save_file(tensors, str(out / file), metadata={"format": "pt"})
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, {k: (file, t.numel() * t.element_size()) for k, t in tensors.items()}
                           if writer else {})
    if dist.get_rank() == 0:
        weight_map = {k: f for part in keys for k, (f, _) in part.items()}
        if pp > 1:
            total = sum(n for part in keys for _, n in part.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (out / "config.json").write_text(json.dumps(hf_config(spec, tied, dtype), indent=2, sort_keys=True) + "\n")
        copied = _copy_tokenizer(spec, out)
        log(f"Hugging Face folder written to {out}: {len(weight_map)} tensors in {dtype}"
            + (", tied embeddings" if tied else "") + (f"; tokenizer files {', '.join(copied)}" if copied else ""))
    dist.barrier()
    return out


def _copy_tokenizer(spec, out: Path) -> list[str]:
    """The tokenizer files of ``[data] tokenizer = "hf:PATH"``, else of the hf: init folder, if any."""
    folders = []
    if spec.data.tokenizer.startswith("hf:"):
        folders.append(resolve(spec, spec.data.tokenizer.split(":", 1)[1]))
    kind, _, where = spec.model.init.partition(":")
    if kind == "hf":
        folders.append(resolve(spec, where))
    for folder in folders:
        names = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
        if names:
            for n in names:
                if (folder / n).resolve() != (out / n).resolve():
                    shutil.copyfile(folder / n, out / n)
            return names
    return []
