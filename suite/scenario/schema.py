"""The scenario language: one typed, documented dataclass per TOML section.

Every key has a default and a one-line doc (``doc(...)``), and every numeric key a documented range or a
list of choices, checked for every section in one place (``suite.scenario.loader.build_section``).
Plug-ins add their own sections through ``suite.registry``: a technique ``[tricks.<name>]``, a parallel
mode the table ``[parallel] <name> = {...}`` (``VariantSpec.modes``); the core schema does not know them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from suite import registry
from suite.fields import BIG, describe_range, doc, out_of_range, parse_range  # noqa: F401  (the schema's vocabulary)

@dataclass
class ModelConfig:
    """[model]: the transformer's shape. A preset fills every key; explicit keys override it."""

    preset: str | None = doc("Named shape: tiny, gpt-base, gpt-1b, llama-7b, llama-13b, llama-33b, llama-65b.")
    num_layers: int | None = doc("Transformer layers.", range="[1, 4096]")
    hidden_size: int | None = doc("Model width h.", range="[1, 1048576]")
    num_attention_heads: int | None = doc("Attention heads.", range="[1, 65536]")
    num_query_groups: int | None = doc("Key/value heads for grouped-query attention (default: = heads).",
                                       range="[1, 65536]")
    ffn_hidden_size: int | None = doc("SwiGLU inner width (default: 8h/3 rounded up to 64).", range="[1, 4194304]")
    vocab_size: int | None = doc("Vocabulary size before padding to a multiple of 128.", range="[1, 16777216]")
    max_sequence_length: int | None = doc("Longest sequence the model accepts.", range="[1, 16777216]")
    rope_base: float = doc("RoPE base frequency.", 10000.0, range="(1, 1e12]")
    norm_epsilon: float = doc("RMSNorm epsilon.", 1e-5, range="(0, 1]")
    init_std: float = doc("Std of the normal weight init; output projections use std/sqrt(2L).", 0.02,
                          range="(0, 10]")
    init: str = doc("Initial weights: 'random'; 'checkpoint:PATH' (a save_checkpoint directory, any TP/PP); "
                    "'hf:PATH' (a local Hugging Face LLaMA-family directory: config.json + safetensors, whose "
                    "shape the [model] keys must match). Paths are relative to the scenario file.", "random")
    kernels: str = doc("Kernel back-end, the same function computed by different kernels (suite.models.kernels): "
                       "'torch' (megatron-core's local layers, unfused: the reference); 'fused' (megatron-core's "
                       "own fusions that need no Transformer Engine: SwiGLU, and the vocab cross-entropy with bf16 "
                       "weights, plus torch's fused AdamW); 'compile' ('fused' with each transformer layer, and the "
                       "decode step, under torch.compile, which fuses RMSNorm, RoPE and the residual adds).", "torch",
                       choices=("torch", "fused", "compile"))
    kernel_tuning: str = doc("kernels = 'compile' in training only: how inductor tunes the kernels it generates "
                             "for the transformer layers. 'default' (torch's heuristics: one launch "
                             "configuration per kernel, compiled in about a minute on the 1B model); "
                             "'coordinate_descent' (each generated kernel's block sizes and warps searched by "
                             "timing it on the GPU: the same kernels, a longer first compile, cached by inductor "
                             "across runs). The compiled decode step always autotunes (max-autotune).", "default",
                             choices=("default", "coordinate_descent"))


@dataclass
class ParallelConfig:
    """[parallel]: how the model is spread over GPUs (world = tp * pp * dp)."""

    tp: int = doc("Tensor-parallel size.", 1, range="[1, 1024]")
    pp: int = doc("Pipeline-parallel size (1F1B schedule when > 1).", 1, range="[1, 1024]")
    dp: int | None = doc("Data-parallel size; derived from the world size when omitted.", range="[1, 1048576]")
    vpp: int | None = doc("Virtual pipeline stages per pipeline rank (interleaved 1F1B).", range="[1, 1024]")
    sequence_parallel: bool = doc("Megatron sequence parallelism (needs tp > 1).", False)
    recompute: str = doc("Activation recompute.", "none", choices=("none", "selective", "full"))


@dataclass
class WorkloadConfig:
    """[workload]: what is run and measured."""

    kind: str = doc("What to measure: training, inference latency (suite.workloads.inference), or held-out "
                    "accuracy of a model and of its parallel mode's form, before and after recovery "
                    "(suite.workloads.accuracy).",
                    "train", choices=("train", "inference", "accuracy"))
    steps: int = doc("Optimizer steps, warm-up included.", 20, range=f"[1, {BIG}]")
    warmup_steps: int = doc("First steps excluded from timing (compilation, allocator warm-up).", 3,
                            range=f"[0, {BIG}]")
    global_batch: int = doc("Sequences per optimizer step, over all data-parallel ranks.", 8,
                            range="[1, 16777216]")
    micro_batch: int = doc("Sequences per forward/backward on one rank.", 2, range="[1, 16777216]")
    seq_length: int = doc("Tokens per sequence.", 128, range="[1, 16777216]")
    precision: str = doc("Parameter/compute precision: bf16 keeps fp32 master weights; fp8 is bf16 with the "
                         "transformer layers' linear GEMMs in float8 (torchao float8 training, dynamic tensorwise "
                         "scaling; needs a GPU of compute capability >= 8.9 and tp = 1).", "fp32",
                         choices=("fp32", "bf16", "fp8"))
    fp8_fast_accumulation: str = doc("precision fp8 only (other precisions have no float8 GEMM): which float8 "
                                     "GEMMs accumulate in the tensor cores' fast mode (cuBLAS fast accumulation, "
                                     "partial sums kept at lower precision than fp32): 'forward' the output GEMM "
                                     "only, the default of torchao's and Transformer Engine's recipes; "
                                     "'forward_and_input_grad' the input-gradient GEMM too; 'all' the weight-"
                                     "gradient GEMM as well, whose inner dimension is the micro-batch's token "
                                     "count. Faster, less precise: compare the loss with bf16's seed-to-seed "
                                     "spread before trusting it.", "forward",
                                     choices=("forward", "forward_and_input_grad", "all"))
    optimizer: str = doc("Optimizer.", "adam", choices=("adam", "sgd"))
    lr: float = doc("Peak learning rate.", 3e-4, range="(0, 100]")
    min_lr: float = doc("Final learning rate of the decay.", 3e-5, range="[0, 100]")
    lr_schedule: str = doc("Decay after warm-up.", "cosine", choices=("cosine", "linear", "constant"))
    lr_warmup_steps: int = doc("Linear LR warm-up steps.", 0, range=f"[0, {BIG}]")
    weight_decay: float = doc("Decoupled weight decay.", 0.1, range="[0, 100]")
    clip_grad: float = doc("Global gradient-norm clip (0 disables).", 1.0, range="[0, 1e9]")
    seed: int = doc("Seed for weights and data order; same seed, same function at any parallelism.", 1234,
                    range="[0, 4294967295]")
    log_interval: int = doc("Print a progress line every N steps (rank 0).", 10, range=f"[1, {BIG}]")
    eval_interval: int = doc("Validation loss every N steps (0: only at the end).", 0, range=f"[0, {BIG}]")
    eval_batches: int = doc("Global batches of held-out windows per validation (same at any layout).", 4,
                            range="[1, 1048576]")
    target_loss: float | None = doc("Stop at the first validation at or below this loss and record the "
                                    "time, tokens and FLOPs it took (needs eval_interval).", range="[0, 1000]")
    save_checkpoint: str | None = doc("Directory the trained model is saved to at the end of the variant "
                                      "(megatron distributed checkpoint, loadable at any TP/PP with [model] "
                                      "init = 'checkpoint:PATH'); relative to the scenario file; an earlier "
                                      "checkpoint there is replaced.")
    timeout_s: int = doc("Collective timeout; a hung rank fails the variant after this long.", 600,
                         range="[1, 31536000]")
    deterministic: bool = doc("Deterministic kernels, as Megatron-LM's --deterministic-mode and torchtitan's "
                              "deterministic debug option: torch.use_deterministic_algorithms (ops without a "
                              "deterministic kernel warn), cuDNN without autotuning, CUBLAS_WORKSPACE_CONFIG="
                              "':4096:8' (read when cuBLAS starts: a launched variant's fresh processes get it; "
                              "under bare torchrun set it for the whole launch). Slower; for telling "
                              "nondeterminism apart from a bug (suite.launch.spmd.deterministic).", False)
    batch_sizes: list[int] = doc("inference: sequences per request (a grid axis).", factory=lambda: [1],
                                 range="[1, 1048576]")
    prompt_lengths: list[int] = doc("inference: prompt tokens per sequence, prefilled at once (a grid axis).",
                                    factory=lambda: [128], range="[1, 16777216]")
    gen_lengths: list[int] = doc("inference: tokens generated per sequence, one decode step each (a grid axis; "
                                 "0: prefill only).", factory=lambda: [32], range="[0, 16777216]")
    repeats: int = doc("inference: timed requests per grid point.", 10, range="[1, 1000000]")
    warmup_repeats: int = doc("inference: untimed requests before them.", 2, range="[0, 1000000]")
    cuda_graph: str = doc("inference: decode steps eager, replayed from a CUDA graph, or both (GPU only).",
                          "off", choices=("off", "on", "both"))

    @property
    def bf16(self) -> bool:
        """Weights and activations in bf16: fp8 too, where only the linear layers' GEMMs run in float8."""
        return self.precision in ("bf16", "fp8")


@dataclass
class DataConfig:
    """[data]: where tokens come from."""

    source: str = doc("'synthetic' (uniform random tokens, for speed), 'text' (a UTF-8 file), 'jsonl' (one JSON "
                      "object per line, the text under text_key), 'hf' (a Hugging Face `datasets` dataset saved "
                      "with save_to_disk, read offline with load_from_disk: path = its folder, the text under "
                      "text_key, split = which split) or 'megatron' (a megatron indexed dataset, already "
                      "tokenized: path = the PREFIX of PREFIX.bin/PREFIX.idx).", "synthetic",
                      choices=("synthetic", "text", "jsonl", "hf", "megatron"))
    path: str | None = doc("Corpus file (or indexed-dataset prefix), relative to the scenario file; "
                           "'builtin:shakespeare' is a small corpus shipped with suite.")
    tokenizer: str = doc("Tokenizer for text and jsonl: 'byte' (each UTF-8 byte), 'bpe' (a byte-level BPE trained "
                         "on the training split, bpe_vocab_size ids) or 'hf:PATH' (a local Hugging Face tokenizer "
                         "folder, relative to the scenario file). Tokens are cached (`suite data prepare`).", "byte")
    text_key: str = doc("jsonl: the key of each line's text; hf: the column of text.", "text")
    split: str | None = doc("hf: the split of a DatasetDict folder (default: 'train', else its only split).")
    bpe_vocab_size: int = doc("bpe: vocabulary size (at most [model] vocab_size).", 1024, range="[257, 16777216]")
    valid_fraction: float = doc("Tail fraction of the corpus held out for validation.", 0.05, range="(0, 1)")


@dataclass
class EvalConfig:
    """[eval]: accuracy measurements next to speed."""

    validation: bool = doc("Measure held-out loss at the end of the variant.", True)
    heldout_text: bool = doc("Training on a text or jsonl corpus: score the final model on the validation tail "
                             "(rolling windows of seq_length, suite.eval) and record its loss, perplexity and "
                             "bits per byte as metrics.heldout.", True)
    heldout_max_tokens: int | None = doc("heldout_text: score at most this many tokens from the start of the "
                                         "validation tail; default: as many as one validation reads (eval_batches "
                                         "x global_batch x seq_length: the same windows when the tail holds them, "
                                         "so its loss is the validation loss). The record says how many were "
                                         "scored.", range="[1, 1099511627776]")
    tasks: list[str] = doc("accuracy workload: zero-shot multiple-choice tasks, JSON-lines files of {context, "
                           "choices, label} (as HellaSwag, PIQA, ARC ship), relative to the scenario file; "
                           "acc and acc_norm (lm-evaluation-harness's definitions) of every model measured.",
                           factory=list)
    text: str | None = doc("accuracy workload: a UTF-8 text file (relative to the scenario file, e.g. WikiText-2's "
                           "test split) scored with the variant's tokenizer in rolling windows of seq_length "
                           "moved by text_stride tokens; perplexity per token and bits per byte of every model "
                           "measured. A tokenizer with a BOS token conditions the first token on it (as "
                           "lm-evaluation-harness does); otherwise the first token is context only.")
    text_stride: int | None = doc("text: tokens each window moves on, and scores (each with seq_length - stride "
                                  "tokens of extra context); default seq_length: windows that overlap by one "
                                  "token, lm-evaluation-harness's loglikelihood_rolling.",
                                  range="[1, 1099511627776]")


@dataclass
class ReportConfig:
    """[report]: how results are compared."""

    baseline: str | None = doc("Variant the others are compared against (default: the first).")
    title: str | None = doc("Heading of the report (default: the scenario name).")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "workload": WorkloadConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "report": ReportConfig,
}


@dataclass
class VariantSpec:
    """One fully resolved variant: what a single run of the runner executes."""

    scenario: str
    name: str
    file: str
    model: ModelConfig
    parallel: ParallelConfig
    workload: WorkloadConfig
    data: DataConfig
    eval: EvalConfig
    report: ReportConfig
    tricks: dict[str, Any] = field(default_factory=dict)
    is_baseline: bool = False
    modes: dict[str, Any] = field(default_factory=dict)  # parallel modes in use: name -> typed table

    def world_size(self, launched: int | None = None) -> int:
        """GPUs this variant needs: a parallel mode's rule when it has one; else tp*pp*dp, with dp taken
        from the launch (or 1) when omitted; inference: tp*pp (one model, never replicated)."""
        for name, cfg in self.modes.items():
            rule = registry.mode(name).world_size
            need = rule(self, cfg) if rule else None
            if need is not None:
                return need
        p = self.parallel
        if self.workload.kind == "accuracy":  # one process (validated: tp = pp = 1)
            return 1
        if self.workload.kind == "inference":
            return p.tp * p.pp
        if p.dp is not None:
            return p.tp * p.pp * p.dp
        if launched is not None:
            return launched
        return p.tp * p.pp

    def resolved(self) -> dict:
        """The variant as plain data (for records, hashing and `suite plan`): a parallel mode's table sits
        under ``parallel.<name>`` (null when unused), where the user writes it."""
        from dataclasses import asdict

        registry.load()
        out = {s: asdict(getattr(self, s)) for s in SECTIONS}
        out["parallel"].update({name: asdict(self.modes[name]) if name in self.modes else None
                                for name in registry.PARALLEL_MODES})
        out["tricks"] = {k: asdict(v) for k, v in self.tricks.items()}
        return out


NO_DEFAULT = object()


def default_at(path: str):
    """The schema default of one dotted key of a resolved config (``parallel.cqil.finetune.alpha``),
    plug-in tables included: a key that a newer schema added holds this value in new records and is
    absent from older ones. ``NO_DEFAULT`` where the path names no key with a default (an unknown key, a
    required one, or a table)."""
    import dataclasses
    import typing

    registry.load()
    head, *rest = path.split(".")
    if head in ("parallel", "tricks") and rest:
        plugins = registry.PARALLEL_MODES if head == "parallel" else registry.TRICKS
        if rest[0] in plugins:
            cls, rest = plugins[rest[0]].config, rest[1:]
            if not rest:
                # an unused parallel mode is null; a technique's table has no default
                return None if head == "parallel" else NO_DEFAULT
        else:
            cls = SECTIONS.get(head)
    else:
        cls = SECTIONS.get(head)
    for i, name in enumerate(rest):
        spec = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if name not in spec:
            return NO_DEFAULT
        f, last = spec[name], i == len(rest) - 1
        if last:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return NO_DEFAULT
        # a nested table (e.g. ``finetune: Finetune | None``): its own fields hold the defaults below it
        hint = typing.get_type_hints(cls)[name]
        cls = next((t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)), None)
        if cls is None:
            return NO_DEFAULT
    return NO_DEFAULT

