"""Kernel back-ends (``[model] kernels``): the same function computed by different kernels.

Every back-end trains the same model from the same weights; only the kernels that compute it change, so
a variant that differs only in ``kernels`` measures the kernels. This module is their one home: what
each back-end changes, as data (``BACKENDS``), and the functions the model builder and the trainer call
(``config_overrides``, ``fuse_weight_grad_accumulation``, ``compile_layers``, ``fuse_optimizer``).

* ``torch``: megatron-core's local layers as they are, unfused: the reference.
* ``fused``: megatron-core's own fusions that need no Transformer Engine, switched on through
  ``TransformerConfig`` fields, plus torch's fused AdamW:

  - ``bias_activation_fusion``: the MLP's SwiGLU runs as megatron's jit-fused
    ``megatron.core.fusions.fused_bias_swiglu`` (one kernel for silu(gate) * up, forward and backward,
    instead of four elementwise kernels and their saved intermediates);
  - ``cross_entropy_loss_fusion`` with ``cross_entropy_fusion_impl = "native"``: the loss is megatron's
    fused vocab-parallel cross-entropy (``megatron.core.fusions.fused_cross_entropy``), which fuses the
    max/exp/sum/target-logit steps over the padded vocabulary, the largest activation of a small model.
    Only with bf16 weights: its backward always returns the logits' gradient in bf16, which under fp32
    weights would round the gradient (measured: 9e-4 of the largest output-layer gradient, fp32 CPU)
    and so compute another function; fp32 variants keep megatron's unfused cross-entropy;
  - megatron-core 0.16 without Transformer Engine or apex builds ``torch.optim.AdamW`` with its default
    multi-tensor (``foreach``) step; ``fuse_optimizer`` switches it to the single fused kernel
    (``fused=True``), on CUDA and on CPU (torch >= 2.4 has a fused CPU AdamW).

  - the weight gradient accumulates straight into megatron's fp32 gradient buffer (``main_grad``) in the
    GEMM that computes it (``fuse_weight_grad_accumulation``, below);

  ``apply_rope_fusion`` needs Transformer Engine, and megatron's local spec uses a plain torch RMSNorm
  (its fused norms are Transformer Engine or apex modules), so ``fused`` leaves RoPE and RMSNorm unfused.
* ``compile``: ``fused`` plus each ``TransformerLayer`` under ``torch.compile`` (inductor), which fuses
  what megatron cannot without Transformer Engine: RMSNorm, the RoPE rotation, the residual adds and the
  casts around them; at tp = 1 the LM head's loss is compiled too (``compile_loss``). The layer spec is
  unchanged; the built layers are compiled in place (``nn.Module.compile``), so parameter names,
  checkpoints and hooks stay those of the eager model.

``[model] kernel_tuning = "coordinate_descent"`` compiles the layers with inductor's coordinate-descent
tuning: each generated Triton kernel's block sizes and warp count are searched by timing the kernel on
the GPU, starting from torch's heuristic choice. The kernels and their arithmetic stay those of
``compile``; the float8 layers' many amax/cast/transpose kernels gain most (the 1B fp8 step on one H200:
626 -> 634 TFLOP/s; bf16 hardly moves: ``reports/kernels_tuning_h200.md``). The first compile takes
minutes instead of one; inductor's cache keeps the tuned configurations for later runs. CPU code
generation has no such search.

Layers compile with ``dynamic=None`` (torch's default): the first call specialises to its shapes and a
later call with another sequence length (random-LTD's kept tokens, held-out text windows) recompiles once
with symbolic sizes instead of once per length.

Graph breaks: every ``RowParallelLinear`` forward of megatron-core 0.16 passes ``tp_group=None`` down and
``megatron.core.utils.get_tensor_model_parallel_group_if_none`` then calls ``warnings.warn`` (a
deprecation notice), which dynamo cannot trace; the attention's break falls inside megatron's activation
offloading context manager, so dynamo also gives up on the rest of that frame. ``torch._dynamo.explain``
of a local-spec layer in training (torch 2.13, CPU) counted 8 breaks and 9 graphs. ``compile_layers``
therefore substitutes a no-op for ``warnings.warn`` inside compiled graphs (``torch.compiler.
substitute_in_graph``; eager code warns as before), and a layer compiles to one graph with no break.
The cost: a warning raised inside a compiled region is not shown.

Under tensor parallelism megatron's column-parallel linears all-reduce their input's gradient asynchronously
inside ``LinearWithGradAccumulationAndAsyncCommunication``; dynamo cannot trace that backward
(``async_op=True``), and its break falls inside the activation-offloading context, so dynamo ran the whole
layer eagerly and compiled its pieces separately: the 1B model with tp = 2 on two H200s made about 800
compiled calls a step, its host time (0.70 s a step, profiled) exceeded its device time (0.34 s), and it ran
540 ms a step against 462 on one GPU (reports/gpt1b_parallel_h200x2.md). ``compile_layers`` switches those
linears to megatron's synchronous path for the same all-reduce (``copy_to_tensor_model_parallel_region``,
taken when ``allreduce_dgrad`` is off), which traces: one graph per layer at any tp. Sequence parallelism
has no such path (its all-gather and reduce-scatter run asynchronously inside the same autograd function),
so its compiled layers still split. Records keep the graph and break counts (``metrics.compile``).

Weight-gradient accumulation: megatron's DDP keeps an fp32 gradient buffer per parameter (``main_grad``)
and, after each micro-batch's backward, adds the bf16 weight gradient into it from a hook: one more pass
over every weight, read bf16 + read fp32 + write fp32 (the 1B model on one H200: 4.2% of the step, 19.8
ms, ``reports/records/profile_gpt1b_parallel_single_rank0_h200x2.txt``). megatron's own fusion of that add
into the weight-gradient GEMM (``gradient_accumulation_fusion``) needs apex's CUDA extension and sets
attributes inside its backward, which dynamo cannot trace (measured on CPU with a stand-in kernel: 19 graph
breaks in one layer).
``fuse_weight_grad_accumulation`` gives each of the model's Column/RowParallelLinear a ``_forward_impl``
(the method megatron's linears call for their GEMMs) whose backward is one GEMM that adds
``grad_output^T @ input`` into ``main_grad`` in fp32 (``torch.addmm`` with ``out_dtype``, cuBLAS with
beta = 1: what apex's kernel does), through a custom op that dynamo and inductor keep as one in-place call.
The backward still hands autograd an uninitialised weight gradient, so megatron's DDP hook fires (its
bucket bookkeeping for overlapped DP reduction) and, seeing ``grad_added_to_main_grad``, skips its add.
The function is unchanged; the arithmetic improves: the micro-batch's gradient is no longer rounded to
bf16 before it is summed. On CPU ``addmm`` has no ``out_dtype``: the op computes the gradient and adds it,
as megatron's hook does. Linears that keep megatron's path: sequence parallelism, the asynchronous input-
gradient all-reduce (``fused`` with tp > 1; ``compile`` switches it off, above), a weight passed in from
elsewhere (the LM head of tied embeddings, whose embedding gradient also lands on that weight), and any
module before megatron's DDP has given its weight a ``main_grad``.
fp8's float8 linears (``suite.models.fp8``) compute their weight gradient in torchao's float8 GEMM, which
returns bf16 and cannot add into an fp32 buffer (``torch._scaled_mm`` has no beta); they declare
``weight_grad_into_main_grad``, which this switches on, and pass their weight through
``weight_into_main_grad``, whose backward adds that bf16 gradient into ``main_grad`` in one vectorized pass
(a Triton kernel on CUDA) instead of the hook's mixed-dtype ``add_``, which takes torch's unvectorized
kernel (the 1B fp8 step on one H200: 9.7 ms of device time a step against the hook's 17.3,
``reports/records/profile_kernels_fp8_{add_op,hook_add}_rank0_h200.txt``; ``reports/README.md``).

A technique's layer that overrides ``TransformerLayer.forward`` (random-LTD's token dropping) keeps that
forward eager and compiles the two halves megatron's forward calls through ``self``
(``_forward_attention``: norm, attention, residual; ``_forward_mlp``: norm, MLP, residual). Compiling
its forward instead guards on the technique's per-step Python state (random-LTD's step, sample offset
and layer number): every step recompiled until dynamo's recompile limit left the layer eager. The halves
see only tensors of a new length, which ``dynamic=None`` covers; random-LTD trains the same losses
compiled (tests/test_kernels.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

try:  # torch's CUDA wheels ship it; a CPU-only install may not, and needs no kernel of it
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# megatron-core's fusions that need no Transformer Engine (see the module docstring)
_FUSED_CONFIG = {"bias_activation_fusion": True}
# ... and the one that needs bf16 weights (its backward casts the logits' gradient to bf16)
_FUSED_BF16_CONFIG = {"cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "native"}


@dataclass(frozen=True)
class Backend:
    """What one kernel back-end changes."""

    config: dict = field(default_factory=dict)  # TransformerConfig overrides
    bf16_config: dict = field(default_factory=dict)  # ... added when the weights are bf16
    fused_optimizer: bool = False  # torch's single-kernel AdamW step instead of the foreach one
    fused_wgrad_accumulation: bool = False  # weight gradients added into main_grad by their GEMM
    compiled_layers: bool = False  # each TransformerLayer under torch.compile
    # layer spec: no back-end changes the recipe; megatron's fusions are config switches and compile
    # wraps the built layers, so techniques' spec hooks compose with every back-end unchanged


BACKENDS = {
    "torch": Backend(),
    "fused": Backend(config=_FUSED_CONFIG, bf16_config=_FUSED_BF16_CONFIG, fused_optimizer=True,
                     fused_wgrad_accumulation=True),
    "compile": Backend(config=_FUSED_CONFIG, bf16_config=_FUSED_BF16_CONFIG, fused_optimizer=True,
                       fused_wgrad_accumulation=True, compiled_layers=True),
}


def backend(spec) -> Backend:
    return BACKENDS[spec.model.kernels]


def config_overrides(spec) -> dict:
    """The ``TransformerConfig`` fields the variant's back-end sets."""
    b = backend(spec)
    return {**b.config, **(b.bf16_config if spec.workload.bf16 else {})}


def fuse_optimizer(spec, optimizer) -> int:
    """Switch the torch Adam/AdamW inside a megatron optimizer to the fused kernel; returns how many
    torch optimizers it switched (0 for the ``torch`` back-end, SGD, or an already fused apex/TE Adam).

    megatron builds torch's AdamW without ``fused`` (it expects apex's or TE's FusedAdam); torch's Adam
    reads ``group['fused']`` and ``group['foreach']`` at every ``step`` (and creates the step counters on
    the parameters' device for a fused group at the first step), so setting them on the param groups
    before the first step is the same as constructing it with ``fused=True``. ``foreach`` goes False:
    torch refuses both at once.
    """
    if not backend(spec).fused_optimizer:
        return 0
    switched = 0
    for inner in torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        if any(inner.state.values()):
            raise RuntimeError("fuse_optimizer: call it before the first optimizer step")
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        switched += 1
    return switched


def torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron optimizer (a ChainedOptimizer of per-dtype optimizers)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in torch_optimizers(c)]
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return [inner]
    return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else []


@torch.library.custom_op("suite::accumulate_weight_grad_", mutates_args=("main_grad",))
def accumulate_weight_grad_(main_grad: torch.Tensor, inputs: torch.Tensor, grad_output: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ inputs`` (2-D: tokens x features), summed in ``main_grad``'s dtype."""
    if inputs.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), inputs)
    elif main_grad.is_cuda:  # bf16 operands, fp32 accumulator: one cuBLAS GEMM with beta = 1
        torch.ops.aten.addmm.dtype_out(main_grad, grad_output.t(), inputs, main_grad.dtype, out=main_grad)
    else:  # no out_dtype on CPU: the gradient, then the add megatron's DDP hook would do
        main_grad.add_(grad_output.t().matmul(inputs).to(main_grad.dtype))


@accumulate_weight_grad_.register_fake
def _(main_grad, inputs, grad_output) -> None:
    return None


def add_into_main_grad(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    """``main_grad += grad`` in ``main_grad``'s dtype: megatron's DDP hook's add, vectorized on CUDA. A plain
    Triton kernel call, which dynamo traces and inductor launches from its own wrapper: a custom op
    around it cost ~120 us of host time per call, more than the GPU time it saved."""
    if main_grad.is_cuda and main_grad.is_contiguous() and grad.is_contiguous():
        n = main_grad.numel()
        _add_kernel[(triton.cdiv(n, _ADD_BLOCK),)](main_grad, grad, n, BLOCK=_ADD_BLOCK)
    else:
        main_grad.add_(grad)


_ADD_BLOCK = 4096  # elements per program: 16 KiB of fp32 accumulator
if triton is not None:
    @triton.jit
    def _add_kernel(acc_ptr, grad_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        acc = tl.load(acc_ptr + offsets, mask=mask)
        grad = tl.load(grad_ptr + offsets, mask=mask)
        tl.store(acc_ptr + offsets, acc + grad.to(acc.dtype), mask=mask)


class _WeightGradIntoMainGrad(torch.autograd.Function):
    """The weight itself; the gradient the GEMMs that use it give back is added into ``main_grad``."""

    @staticmethod
    def forward(ctx, weight, main_grad):
        ctx.main_grad = main_grad  # not saved: other micro-batches' backwards add into it in between
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        add_into_main_grad(ctx.main_grad, grad.contiguous())
        # as _LinearIntoMainGrad: a placeholder for megatron's DDP hook, which skips it
        return torch.empty_like(grad), None


def weight_into_main_grad(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` for a GEMM whose weight gradient autograd computes (fp8's float8 linears): under
    megatron's DDP, in a backward pass, that gradient goes straight into ``main_grad``; otherwise
    ``weight`` unchanged."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not weight.requires_grad or not torch.is_grad_enabled():
        return weight
    weight.grad_added_to_main_grad = True  # megatron's DDP resets it at every zero_grad_buffer
    return _WeightGradIntoMainGrad.apply(weight, main_grad)


class _LinearIntoMainGrad(torch.autograd.Function):
    """``inputs @ weight^T (+ bias)`` whose backward adds the weight's gradient into ``main_grad``."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, main_grad):
        ctx.save_for_backward(inputs, weight)
        ctx.main_grad = main_grad  # not saved: other micro-batches' backwards add into it in between
        ctx.has_bias = bias is not None
        out = torch.matmul(inputs, weight.t())
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        main_grad = ctx.main_grad
        grad_output = grad_output.contiguous()
        grad_input = grad_output.matmul(weight)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        accumulate_weight_grad_(main_grad, inputs.reshape(-1, inputs.shape[-1]), flat_grad)
        # autograd still needs a weight gradient for megatron's DDP hook to fire; the hook skips it
        # (grad_added_to_main_grad), so it is left uninitialised
        return grad_input, torch.empty_like(weight), flat_grad.sum(0) if ctx.has_bias else None, None


def fuse_weight_grad_accumulation(spec, chunks) -> int:
    """Give every Column/RowParallelLinear of ``chunks`` the ``_forward_impl`` that accumulates its weight
    gradient into ``main_grad`` in the GEMM, and switch on ``weight_grad_into_main_grad`` of the modules
    that compute their own weight gradient (fp8's float8 linears), when the back-end asks for it (see the
    module docstring); returns how many of both."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if not backend(spec).fused_wgrad_accumulation:
        return 0
    modules = [m for chunk in chunks for m in chunk.modules()]
    linears = [m for m in modules if isinstance(m, ColumnParallelLinear | RowParallelLinear) and m.weight is not None]
    for m in linears:
        m._forward_impl = _forward_impl_into_main_grad(m, m._forward_impl)
    own_gemm = [m for m in modules if hasattr(m, "weight_grad_into_main_grad")]  # fp8's float8 linears
    for m in own_gemm:
        m.weight_grad_into_main_grad = True
    return len(linears) + len(own_gemm)


def _forward_impl_into_main_grad(module, megatron_impl):
    def forward_impl(input, weight, bias=None, *, allreduce_dgrad=False, sequence_parallel=False,
                     grad_output_buffer=None, **kwargs):
        main_grad = getattr(weight, "main_grad", None)
        if (main_grad is None or weight is not module.weight or not weight.requires_grad or allreduce_dgrad
                or sequence_parallel or grad_output_buffer is not None):
            return megatron_impl(input, weight, bias, allreduce_dgrad=allreduce_dgrad,
                                 sequence_parallel=sequence_parallel, grad_output_buffer=grad_output_buffer,
                                 **kwargs)
        # megatron's DDP resets this at every zero_grad_buffer; set here, before the backward reads it
        weight.grad_added_to_main_grad = True
        return _LinearIntoMainGrad.apply(input, weight, bias, main_grad)

    return forward_impl


def compile_layers(spec, chunks) -> int:
    """Put every ``TransformerLayer`` of ``chunks``, and the LM head's loss where ``compile_loss`` applies,
    under torch.compile when the back-end asks for it; returns how many layers. In place
    (``nn.Module.compile``, or compiled methods on the instance): the modules, their parameters and their
    names stay those of the eager model."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if not backend(spec).compiled_layers:
        return 0
    no_warnings_in_graphs()
    options = TUNING[spec.model.kernel_tuning]
    for chunk in chunks:
        compile_loss(chunk, options)
    layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        _synchronous_input_grad_allreduce(layer)
        # dynamic=None: see the module docstring (static first, symbolic on a new length)
        if type(layer).forward is TransformerLayer.forward:
            layer.compile(dynamic=None, options=options)  # the whole layer: one graph
        else:  # a technique's forward stays eager; megatron's forward calls these two through self
            layer._forward_attention = torch.compile(layer._forward_attention, dynamic=None, options=options)
            layer._forward_mlp = torch.compile(layer._forward_mlp, dynamic=None, options=options)
    return len(layers)


def language_model_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """megatron's ``compute_language_model_loss`` at tp = 1: the per-token cross-entropy [b, s] of logits
    [s, b, vocab] against labels [b, s], in fp32 from the logits as they come (bf16 or fp32)."""
    s, b, vocab = logits.shape
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(s * b, vocab), labels.t().reshape(s * b),
                                             reduction="none")
    return loss.view(s, b).t().contiguous()


def compile_loss(chunk, options=None) -> bool:
    """The LM head's loss of ``chunk`` (a GPTModel holding the output layer, tp = 1) under torch.compile:
    inductor computes the softmax's maximum and sum in one pass over the logits, keeps only the bf16 logits
    and two numbers a token for the backward, and recomputes the softmax there in the pass that writes the
    logits' gradient. megatron's fused cross-entropy (``cross_entropy_fusion_impl = "native"``) keeps the
    fp32 softmax (4 bytes a token and vocabulary entry, twice the logits) and passes over it four times.
    The 1B model on one H200, the same machine before and after: ``compile`` 443.9 -> 433.3 ms a step and 2.5
    GB less peak memory, fp8 379.7 -> 375.9 ms (``reports/kernels_compiled_loss_h200.md``).
    Under tensor parallelism the vocabulary is split over ranks and the loss needs megatron's all-reduces:
    megatron's stays. Returns whether it compiled."""
    if not getattr(chunk, "post_process", False) or chunk.config.tensor_model_parallel_size > 1:
        return False
    chunk.compute_language_model_loss = torch.compile(language_model_loss, dynamic=None, options=options)
    return True


# [model] kernel_tuning: inductor options for the compiled layers (same kernels, other launch configurations)
TUNING = {"default": None, "coordinate_descent": {"coordinate_descent_tuning": True}}


def _synchronous_input_grad_allreduce(layer) -> None:
    """Tensor parallelism: the column-parallel linears all-reduce their input's gradient through megatron's
    synchronous path (``copy_to_tensor_model_parallel_region``) instead of the asynchronous one inside
    ``LinearWithGradAccumulationAndAsyncCommunication``, whose backward dynamo cannot trace (see the module
    docstring). Both sum the same gradient over the tensor-parallel ranks."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    for m in layer.modules():
        if isinstance(m, ColumnParallelLinear) and m.allreduce_dgrad:
            m.allreduce_dgrad = False


def compile_stats(spec) -> dict | None:
    """What dynamo made of this process's compiled code so far: {'graphs', 'graph_breaks'}, for a record
    (a break is host time a step: the compiled pieces run one after another from Python); None when the
    back-end compiles nothing."""
    if not backend(spec).compiled_layers:
        return None
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


_SILENCED = []


def no_warnings_in_graphs() -> None:
    """``warnings.warn`` traced by dynamo becomes a no-op, once per process (see the module docstring:
    megatron's per-call deprecation warning would otherwise split every layer into 9 graphs)."""
    if _SILENCED:
        return
    import warnings

    def _warn_in_graph(*args, **kwargs):
        return None

    try:
        torch.compiler.substitute_in_graph(warnings.warn, skip_signature_check=True)(_warn_in_graph)
    except (AttributeError, TypeError, ValueError) as e:  # a torch without it: breaks cost speed, not results
        warnings.warn(f"compiled layers keep megatron's graph breaks: {e}")
    _SILENCED.append(_warn_in_graph)
