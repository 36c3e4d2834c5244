"""FP8 training (``[workload] precision = "fp8"``): the transformer layers' linear GEMMs in float8.

What changes: the four linear submodules of megatron's layer spec (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``) become torchao's ``Float8Linear`` with its default recipe, dynamic
tensorwise scaling: each GEMM casts its two operands to float8 with one scale per tensor taken from the
tensor's current absolute maximum (input and weight to e4m3, the output gradient to e5m2), multiplies
on the float8 tensor cores and returns bf16. All three GEMMs of a linear layer (output, input gradient,
weight gradient) run in float8. As in torchao's and Transformer Engine's recipes the output GEMM
accumulates in cuBLAS's fast mode and the two gradient GEMMs promote their partial sums to fp32;
``[workload] fp8_fast_accumulation`` puts the input-gradient GEMM, or both, in the fast mode too
(faster, less precise). Under the ``fused`` and ``compile`` back-ends the bf16 weight gradient is added
into megatron's fp32 gradient buffer by ``kernels.weight_into_main_grad`` (one vectorized pass) instead of
megatron's DDP hook. Everything else is the bf16 variant: bf16 weights and activations, fp32 master
weights and gradients in the optimizer.

Why a subclass of ``Float8Linear`` with megatron's signature: megatron builds the spec's submodules as
``module(input_size, output_size, *, config, init_method, bias, skip_bias_add, ...)`` and expects
``(output, bias)`` back. ``Float8Linear`` is an ``nn.Linear``, so the parameter keeps the name
``weight``: ``gpt.init_parameters`` (which draws by global name, output projections at std/sqrt(2L)),
Hugging Face import and export, and checkpoints work unchanged. The sharded checkpoint keys are those of
megatron's Column/RowParallelLinear, so a checkpoint moves between bf16 and fp8 runs.

What stays bf16, as in torchao's and Transformer Engine's recipes: the embeddings (a lookup, no GEMM),
the LM head (its logits feed the loss's softmax directly, and it is the GEMM most sensitive to float8's
rounding, up to 6% of a value with e4m3's 3 mantissa bits), the norms, and attention's score and value
products. ``suite.models.build`` applies the swap to whatever layer spec it is given, so techniques that
hand in their own spec (random-LTD, Mixture-of-Depths, CQIL) get float8 layers too.

Limits: tensor parallelism 1 only (``Float8Linear`` holds the whole weight and does none of megatron's TP
communication; validate refuses tp > 1). ``torch._scaled_mm`` needs both dimensions of the weight to be
multiples of 16 (validate names the ``[model]`` key that is not). The token count is the inner dimension
of the weight-gradient GEMM and varies (random-LTD's and Mixture-of-Depths' kept tokens, decode steps),
so a layer pads its rows with zeros to a multiple of 16 when it has to: zero rows change neither the
amax-derived scales nor the weight gradient, and their outputs are dropped.

Without CUDA, torchao's emulation (the same float8 casts and scales, then a high-precision matmul) runs
this code path on CPU, which is what the CPU tests exercise. On CUDA the float8 tensor cores need
compute capability >= 8.9 (Ada, Hopper and later); an older GPU is refused with the fix.

MFU is still measured against the dense bf16 peak (``suite.metrics.hardware``), and the model FLOPs are
the same count as for bf16 (``suite.metrics.flops``): TFLOP/s of model FLOPs is the number to compare
across precisions, and an fp8 MFU above the bf16 variant's is the speed-up, not a change of yardstick.

torchao is an optional dependency (``pip install 'suite[fp8]'``): ``suite.models.build`` imports this
module for fp8 variants only.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torchao.float8 import Float8LinearConfig
from torchao.float8.config import Float8GemmConfig
from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

from suite.errors import fail
from suite.models import kernels

SUBMODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ALIGN = 16  # torch._scaled_mm: both dimensions of each operand multiples of 16, but the first one's rows
MIN_CAPABILITY = (8, 9)


class _MegatronFloat8Linear(Float8Linear):
    """``Float8Linear`` built and called like megatron's TP linear layers at tp = 1."""

    tp_axes: dict = {}  # parameter -> the dim megatron's layer splits over TP: its checkpoint layout

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = True,
                 skip_bias_add: bool = False, float8_config: Float8LinearConfig, tp_group=None, **_megatron):
        # _megatron: gather_output / input_is_parallel, is_expert, stride, tp_comm_buffer_name ... mean
        # nothing at tp = 1 without Transformer Engine
        if skip_bias_add and bias:
            raise NotImplementedError("an fp8 linear layer adds its own bias (skip_bias_add with a bias)")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        super().__init__(input_size, output_size, bias=bias, device=device, dtype=config.params_dtype,
                         config=float8_config)
        self.tp_group = tp_group
        # suite draws every weight itself (gpt.init_parameters); megatron's init_method is not used

    # switched on by kernels.fuse_weight_grad_accumulation (fused and compile back-ends)
    weight_grad_into_main_grad: bool = False

    def forward(self, x: torch.Tensor):
        rows = x.numel() // x.shape[-1]
        if rows == 0:  # no token (e.g. a technique's empty part): nothing to scale, no GEMM to run
            return torch.nn.functional.linear(x, self.weight, self.bias), None
        pad = -rows % ALIGN
        if not pad:
            return self._float8_linear(x), None
        flat = torch.nn.functional.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad))
        return self._float8_linear(flat)[:rows].reshape(*x.shape[:-1], self.out_features), None

    def _float8_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``Float8Linear.forward`` (megatron runs no autocast), its weight through
        ``kernels.weight_into_main_grad`` when switched on."""
        weight = kernels.weight_into_main_grad(self.weight) if self.weight_grad_into_main_grad else self.weight
        out = matmul_with_hp_or_float8_args.apply(x, weight.t(), self.linear_mm_config, self.config)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The sharded keys and layout of megatron's layer (MLP's SwiGLU split of fc1 applies to them)."""
        dp_cp = (metadata or {}).get("dp_cp_group")
        groups = dict(tp_group=self.tp_group, dp_cp_group=dp_cp) if dp_cp is not None else {}
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                   self.tp_axes, sharded_offsets, **groups)

    # megatron's linear layers save an empty extra state; so does this one, so the keys match
    def get_extra_state(self) -> None:
        return None

    def set_extra_state(self, state) -> None:
        pass


class Float8ColumnLinear(_MegatronFloat8Linear):
    """For ``linear_qkv`` and ``linear_fc1`` (megatron's ColumnParallelLinear)."""

    tp_axes = {"weight": 0, "bias": 0}


class Float8RowLinear(_MegatronFloat8Linear):
    """For ``linear_proj`` and ``linear_fc2`` (megatron's RowParallelLinear)."""

    tp_axes = {"weight": 1}


REPLACEMENT = {ColumnParallelLinear: Float8ColumnLinear, RowParallelLinear: Float8RowLinear}


def float8_config(fast_accumulation: str = "forward") -> Float8LinearConfig:
    """torchao's default recipe (dynamic tensorwise scaling, fast accumulation in the output GEMM), with
    the input-gradient GEMM (``"forward_and_input_grad"``) or both gradient GEMMs (``"all"``) in fast
    accumulation too; emulated where there is no CUDA."""
    fast = Float8GemmConfig(use_fast_accum=True)
    gradients = {"forward": {}, "forward_and_input_grad": dict(gemm_config_grad_input=fast),
                 "all": dict(gemm_config_grad_input=fast, gemm_config_grad_weight=fast)}[fast_accumulation]
    return Float8LinearConfig(emulate=not torch.cuda.is_available(), **gradients)


def check_device(spec) -> None:
    """Float8 tensor cores: compute capability >= 8.9 on this process's GPU."""
    if not torch.cuda.is_available():
        return
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        fail(spec, "workload.precision", f"fp8 needs float8 tensor cores (compute capability >= 8.9: Ada, "
             f"Hopper or later); {torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}.",
             'run on an H100/H200/L40S-class GPU or set precision = "bf16".')


def _swap(node, cfg: Float8LinearConfig):
    """``node`` (a ModuleSpec, a submodules dataclass, a list of layer specs) with the four linear
    submodules replaced wherever they occur, keeping any params a technique gave them. The containers
    are copied, their other contents shared: a technique's params may hold live state (random-LTD's kept
    length, Mixture-of-Depths' routing) that its runtime updates and its layers must keep seeing."""
    if isinstance(node, (list, tuple)):
        return type(node)(_swap(item, cfg) for item in node)
    if not dataclasses.is_dataclass(node) or isinstance(node, type):  # a module class, a function, a value
        return node
    node = copy.copy(node)
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        module = value.module if isinstance(value, ModuleSpec) else value
        if f.name in SUBMODULES and module in REPLACEMENT:
            params = dict(value.params or {}) if isinstance(value, ModuleSpec) else {}
            setattr(node, f.name, ModuleSpec(module=REPLACEMENT[module], params={**params, "float8_config": cfg}))
        elif f.name != "params":
            setattr(node, f.name, _swap(value, cfg))
    return node


def layer_spec(spec, layer):
    """``layer`` (a megatron layer or block spec, a technique's included) with the transformer layers'
    linear submodules in float8; the argument is not changed."""
    check_device(spec)
    return _swap(layer, float8_config(spec.workload.fp8_fast_accumulation))


def float8_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose GEMMs run in float8."""
    return [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]
