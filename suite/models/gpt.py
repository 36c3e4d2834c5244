"""Build a LLaMA-style megatron-core ``GPTModel`` for a variant, and initialise it deterministically.

LLaMA style: RMSNorm, SwiGLU MLP, RoPE, no biases, grouped-query attention, untied embeddings; imported
weights may add q/k/v biases (Qwen2) and llama3 RoPE scaling (``architecture``).
The layer recipe is megatron-core's local spec with the core attention swapped for torch SDPA
(``suite.models.attention``) and its norms for ``TorchNorm`` (below); techniques change the recipe through
``layer_spec`` hooks rather than forking the model.

Sequence parallelism: megatron's local spec builds its norms as ``WrappedTorchNorm``, which refuses it
(only Transformer Engine's and apex's norms mark their weights for it, and apex's has no RMSNorm).
``TorchNorm`` builds the same torch norm and marks its weights ``sequence_parallel``, the attribute
megatron's ``finalize_model_grads`` reads to sum those weights' gradients over the tensor-parallel ranks
(each rank normed only its part of the sequence). The block's final norm comes from the same class
through ``TransformerBlockSubmodules`` (``build_chunks``).

Initialisation does not use megatron's per-rank RNG: every parameter is drawn as its *full*
(unsharded) tensor from a generator seeded by (seed, global parameter name), and each rank keeps its
own shard. A TP=2 or PP=2 model therefore starts from exactly the same function as TP=1.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import zlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from suite.metrics.flops import padded_vocab
from suite.models import kernels
from suite.models.attention import SDPAttention


ARCHITECTURE = {"qkv_bias": False, "rope_scaling_factor": None}


def architecture(spec) -> dict:
    """Choices of the model that [model] does not express, decided by the weights ``[model] init`` loads:
    ``qkv_bias`` (q/k/v biases, as Qwen2 has) and ``rope_scaling_factor`` (llama3 RoPE scaling; None: none).
    Read from a Hugging Face config.json (``hf_config.architecture``) or a suite checkpoint's common.pt
    (saved with it); a random model is plain LLaMA."""
    kind, _, where = spec.model.init.partition(":")
    if kind not in ("hf", "checkpoint"):
        return dict(ARCHITECTURE)
    from suite.models import checkpoint

    path = checkpoint.resolve(spec, where)
    if kind == "checkpoint":
        return {**ARCHITECTURE, **checkpoint.saved_architecture(path)}
    from suite.models import hf_config

    return {**ARCHITECTURE, **hf_config.architecture(hf_config.read_config(spec, path))}


def transformer_config(spec, **overrides) -> TransformerConfig:
    m, p, w = spec.model, spec.parallel, spec.workload
    bf16 = w.bf16
    recompute = {}
    if p.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif p.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    kwargs = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        add_qkv_bias=architecture(spec)["qkv_bias"],
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, sequence_parallel=p.sequence_parallel,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        perform_initialization=False,  # suite initialises (see module docstring)
        use_cpu_initialization=not torch.cuda.is_available(),
        **recompute,
    )
    kwargs.update(kernels.config_overrides(spec))  # [model] kernels: megatron's own fusions
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class TorchNorm:
    """megatron's ``WrappedTorchNorm`` (torch's RMSNorm or LayerNorm) that also runs under sequence
    parallelism (see the module docstring); a spec submodule, built as ``TorchNorm(config, hidden_size, eps)``."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        norms = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norms:
            raise ValueError(f"TorchNorm: normalization {config.normalization!r} is not one of {sorted(norms)}")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def layer_spec():
    """megatron-core's local layer recipe, with SDPA as the core attention and ``TorchNorm`` as its norms."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = TorchNorm
    spec.submodules.pre_mlp_layernorm = TorchNorm
    return spec


def block_spec(config: TransformerConfig, spec, vp_stage: int | None) -> TransformerBlockSubmodules:
    """This pipeline stage's block with ``TorchNorm`` as its final norm (megatron's default is
    ``WrappedTorchNorm``): ``spec`` for each of its layers, or ``spec`` itself where a parallel mode hands in
    a whole block (CQIL: the layers this rank runs)."""
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(spec, layer_norm=TorchNorm)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=TorchNorm)


def build_chunks(spec, config: TransformerConfig, transformer_layer_spec=None) -> list[GPTModel]:
    """This rank's model chunks (one, or vpp of them for the interleaved schedule)."""
    vpp = spec.parallel.vpp if spec.parallel.vpp and spec.parallel.vpp > 1 else None
    factor = architecture(spec)["rope_scaling_factor"]
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config, transformer_layer_spec=block_spec(config, transformer_layer_spec or layer_spec(), stage),
            vocab_size=padded_vocab(spec.model.vocab_size),
            max_sequence_length=spec.model.max_sequence_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=not vpp, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=not vpp, vp_stage=stage),
            parallel_output=True, share_embeddings_and_output_weights=False,
            # the exact float base (int() here once truncated e.g. 5000.5 silently)
            position_embedding_type="rope", rotary_base=float(spec.model.rope_base),
            rope_scaling=factor is not None, rope_scaling_factor=factor or 8.0, vp_stage=stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> name in the full model (layer indices made global)."""
    prefix_map = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            prefix_map[name + "."] = re.sub(r"layers\.\d+\.$", f"layers.{module.layer_number - 1}.", name + ".")
    out = {}
    for name, _ in model.named_parameters():
        gname = name
        for local, glob in prefix_map.items():
            if name.startswith(local):
                gname = glob + name[len(local):]
                break
        out[name] = gname.replace("module.", "")
    return out


def partition_dims(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> the dim megatron splits over TP ranks (absent: replicated).

    Read from the module types: with ``perform_initialization=False`` megatron does not tag the
    parameters itself, so ``init_parameters`` sets the tags.
    """
    dims = {}
    for mname, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims[f"{mname}.weight"] = 0
            if getattr(module, "bias", None) is not None:  # q/k/v biases: split with their rows
                dims[f"{mname}.bias"] = 0
        elif isinstance(module, RowParallelLinear):
            dims[f"{mname}.weight"] = 1
    return dims


def shard(full: torch.Tensor, dim: int, gname: str) -> torch.Tensor:
    """This TP rank's part of a full parameter split along ``dim`` (QKV: whole query groups)."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if gname.endswith("mlp.linear_fc1.weight"):
        # SwiGLU: megatron keeps [gate_r; up_r] on TP rank r, not a contiguous slice of [gate; up]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def unshard(local: torch.Tensor, dim: int, gname: str) -> torch.Tensor:
    """The full parameter from every TP rank's part: the inverse of ``shard`` (a TP collective)."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    if gname.endswith("mlp.linear_fc1.weight"):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def init_parameters(chunks, seed: int, std: float, num_layers: int) -> None:
    """Normal(0, std) weights (output projections std/sqrt(2L)), norms at 1, biases 0, by global name."""
    tp = ps.get_tensor_model_parallel_world_size()
    out_std = std / math.sqrt(2 * num_layers)
    for chunk in chunks:
        names, dims = global_names(chunk), partition_dims(chunk)
        for name, param in chunk.named_parameters():
            gname = names[name]
            shape = list(param.shape)
            dim = dims.get(name)
            if dim is not None:
                shape[dim] *= tp
                # the grad-norm and optimizer code tell shards from replicas by these attributes
                # (megatron tags biases itself)
                if not hasattr(param, "tensor_model_parallel"):
                    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
            if gname.endswith(".bias"):  # q/k/v biases (gpt.architecture)
                param.zero_()
                continue
            if param.dim() == 1:  # RMSNorm weights
                param.fill_(1.0)
                continue
            gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            s = out_std if gname.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
            full.normal_(0.0, s, generator=gen)
            param.copy_(full if dim is None else shard(full, dim, gname))


def wrap_for_training(chunks, config: TransformerConfig, overlap: bool) -> list:
    """Float16Module for bf16, then megatron's DistributedDataParallel (grad buffers, DP reduce)."""
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                               bucket_size=None if not overlap else 40_000_000)
    wrapped = []
    for i, chunk in enumerate(chunks):
        module = Float16Module(config, chunk) if config.bf16 else chunk
        wrapped.append(DistributedDataParallel(config, ddp_config, module,
                                               disable_bucketing=i > 0))
    return wrapped
