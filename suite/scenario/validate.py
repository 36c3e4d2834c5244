"""Cross-key checks: combinations that cannot run, caught before any process starts."""
from __future__ import annotations

import math
from pathlib import Path

from suite.data.sources import check_data, check_text, file_problem
from suite.errors import fail
from suite.registry import conflicts, mode, trick


def _divisors(n: int, most: int = 12) -> str:
    """'1, 2, 4, 8' (the first `most` divisors, then '...': large widths have many)."""
    ds = [str(d) for d in range(1, n + 1) if n % d == 0]
    return ", ".join(ds[:most]) + (", ..." if len(ds) > most else "")


def check_variant(spec) -> None:
    m, p, w = spec.model, spec.parallel, spec.workload
    for key, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads),
                       ("model.num_query_groups", m.num_query_groups),
                       ("model.ffn_hidden_size", m.ffn_hidden_size), ("model.vocab_size", m.vocab_size),
                       ("model.max_sequence_length", m.max_sequence_length), ("parallel.tp", p.tp),
                       ("parallel.pp", p.pp), ("workload.steps", w.steps),
                       ("workload.global_batch", w.global_batch), ("workload.micro_batch", w.micro_batch),
                       ("workload.seq_length", w.seq_length), ("workload.log_interval", w.log_interval),
                       ("workload.eval_batches", w.eval_batches), ("workload.timeout_s", w.timeout_s)]:
        if value < 1:
            fail(spec, key, f"must be at least 1, got {value}.", f"set {key.split('.')[1]} to a positive integer.")
    for key, value in [("parallel.dp", p.dp), ("parallel.vpp", p.vpp),
                       ("eval.heldout_max_tokens", spec.eval.heldout_max_tokens)]:
        if value is not None and value < 1:
            fail(spec, key, f"must be at least 1, got {value}.", "set a positive integer or remove the key.")
    if m.hidden_size % m.num_attention_heads:
        fail(spec, "model.hidden_size", f"hidden_size {m.hidden_size} is not divisible by "
              f"num_attention_heads {m.num_attention_heads}.",
              f"use heads among {_divisors(m.hidden_size)} or change hidden_size.")
    if m.num_attention_heads % m.num_query_groups:
        fail(spec, "model.num_query_groups", f"num_attention_heads {m.num_attention_heads} is not divisible "
              f"by num_query_groups {m.num_query_groups}.",
              f"use num_query_groups among {_divisors(m.num_attention_heads)}.")
    if m.num_attention_heads % p.tp:
        fail(spec, "parallel.tp", f"num_attention_heads {m.num_attention_heads} is not divisible by tp {p.tp}.",
              f"choose tp among {_divisors(m.num_attention_heads)}.")
    if m.num_query_groups % p.tp:
        fail(spec, "parallel.tp", f"num_query_groups {m.num_query_groups} is not divisible by tp {p.tp}.",
              f"choose tp among {_divisors(m.num_query_groups)} or raise num_query_groups.")
    if m.ffn_hidden_size % p.tp:
        rounded = -(-m.ffn_hidden_size // p.tp) * p.tp
        fits = math.gcd(m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size)  # tp divides all 3
        fail(spec, "parallel.tp", f"ffn_hidden_size {m.ffn_hidden_size} is not divisible by tp {p.tp}.",
              f"set ffn_hidden_size to a multiple of {p.tp} (e.g. {rounded}) "
              f"or choose tp among {_divisors(fits)}.")
    # Before the layer split: with pp = 1 "layers not divisible by vpp" would hide the real problem.
    if p.vpp is not None and p.vpp > 1 and p.pp < 2:
        fail(spec, "parallel.vpp", "virtual pipeline stages need pp > 1.", "set pp >= 2 or remove vpp.")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        what = f"pp {p.pp}" + (f" x vpp {p.vpp}" if p.vpp else "")
        fail(spec, "parallel.pp", f"num_layers {m.num_layers} is not divisible by {what}.",
              f"choose pp (x vpp) among {_divisors(m.num_layers)}.")
    if p.sequence_parallel and p.tp < 2:
        fail(spec, "parallel.sequence_parallel", "sequence parallelism needs tp > 1.",
              "set tp >= 2 or sequence_parallel = false.")
    if w.seq_length > m.max_sequence_length:
        fail(spec, "workload.seq_length", f"seq_length {w.seq_length} exceeds the model's "
              f"max_sequence_length {m.max_sequence_length}.",
              f"set seq_length <= {m.max_sequence_length} or raise model.max_sequence_length.")
    if p.sequence_parallel and w.seq_length % p.tp:
        fail(spec, "workload.seq_length", f"with sequence parallelism seq_length {w.seq_length} must be "
              f"divisible by tp {p.tp}.", "round seq_length to a multiple of tp.")
    if w.global_batch % w.micro_batch:
        fail(spec, "workload.global_batch", f"global_batch {w.global_batch} is not divisible by micro_batch "
              f"{w.micro_batch}.", f"use a global_batch that is a multiple of {w.micro_batch}.")
    if p.dp is not None:
        check_batch(spec, p.dp)
    check_target(spec)
    for key in ("warmup_steps", "lr_warmup_steps", "eval_interval", "weight_decay", "clip_grad"):
        if getattr(w, key) < 0:
            fail(spec, f"workload.{key}", f"{key} cannot be negative, got {getattr(w, key)}.",
                  f"set {key} = 0 or more.")
    if w.warmup_steps >= w.steps:
        fail(spec, "workload.warmup_steps", f"warmup_steps {w.warmup_steps} leaves no timed step of "
              f"{w.steps}.", f"set warmup_steps below {w.steps} or raise steps.")
    if w.lr <= 0:
        fail(spec, "workload.lr", f"lr must be positive, got {w.lr}.", "set e.g. lr = 3e-4.")
    if not 0 <= w.min_lr <= w.lr:
        fail(spec, "workload.min_lr", f"min_lr {w.min_lr} is not between 0 and lr {w.lr}.",
              f"set min_lr between 0 and {w.lr}, e.g. {w.lr / 10:g}.")
    if m.init != "random" and not m.init.startswith(("checkpoint:", "hf:")):
        fail(spec, "model.init", f"init '{m.init}' is not 'random', 'checkpoint:PATH' or 'hf:PATH'.",
              'set init = "random" or prefix the path with checkpoint: or hf:.')
    if m.init.startswith("hf:"):
        from suite.models.hf_config import check_folder

        check_folder(spec)  # config.json: an importable architecture that [model] matches (no torch)
    check_data(spec)  # sources, files, JSON lines, tokenizer vocabulary sizes (suite.data.sources)
    if w.kind == "inference":
        check_inference(spec)
    if w.kind == "accuracy":
        check_accuracy(spec)
    elif spec.eval.tasks:
        fail(spec, "eval.tasks", "multiple-choice tasks are scored by the accuracy workload.",
             'set [workload] kind = "accuracy" (it evaluates [model] init), or remove tasks.')
    elif spec.eval.text is not None or spec.eval.text_stride is not None:
        key = "eval.text" if spec.eval.text is not None else "eval.text_stride"
        fail(spec, key, "a text file is scored by the accuracy workload.",
             'set [workload] kind = "accuracy" (it evaluates [model] init), or remove text and text_stride.')
    if w.precision == "fp8":
        check_fp8(spec)
    if m.kernel_tuning != "default" and (m.kernels != "compile" or w.kind != "train"):
        why = (f"kernels = '{m.kernels}' compiles nothing" if m.kernels != "compile" else
               f"the {w.kind} workload compiles no training layer (its decode step always autotunes)")
        fail(spec, "model.kernel_tuning", f"kernel_tuning tunes the kernels torch.compile generates for the "
             f"training layers; {why}.", 'set kernels = "compile" with kind = "train", or remove kernel_tuning.')
    check_plugins(spec)


def check_fp8(spec) -> None:
    """Float8 GEMMs (suite.models.fp8): torchao installed, tp = 1, weight dimensions multiples of 16."""
    import importlib.util

    m, p = spec.model, spec.parallel
    if importlib.util.find_spec("torchao") is None:
        fail(spec, "workload.precision", "precision fp8 runs its GEMMs through torchao's float8 training, and "
             "torchao is not installed.", "pip install 'suite[fp8]' (or set precision = \"bf16\").")
    if p.tp > 1:
        fail(spec, "parallel.tp", f"precision fp8 supports tp = 1 only (the float8 linear layers hold whole "
             f"weights), got tp {p.tp}.", 'set tp = 1 (split the work with dp or pp) or precision = "bf16".')
    # torch._scaled_mm: both dimensions of every float8 weight are multiples of 16 (hidden: every layer;
    # ffn: fc1 and fc2; the q/k/v width: qkv's output)
    head = m.hidden_size // m.num_attention_heads
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * head
    for key, name, value in [("model.hidden_size", "hidden_size", m.hidden_size),
                             ("model.ffn_hidden_size", "ffn_hidden_size", m.ffn_hidden_size),
                             ("model.num_query_groups", f"the q/k/v projection width (heads + 2 x "
                              f"num_query_groups {m.num_query_groups}) x head size {head}", qkv)]:
        if value % 16:
            fix = (f"set {key.split('.')[1]} to a multiple of 16 (e.g. {-(-value // 16) * 16})"
                   if key != "model.num_query_groups" else
                   "choose num_query_groups so that num_query_groups x head size is a multiple of 8")
            fail(spec, key, f"precision fp8 needs weight dimensions that are multiples of 16 (float8 "
                 f"GEMMs); {name} is {value}.", fix + ', or set precision = "bf16".')


def check_plugins(spec) -> None:
    """Exclusive hooks answered twice (two workload loops, two parallel modes), then each parallel mode's
    own checks (the techniques' run after the variant is built, ``suite.scenario.loader``)."""
    for key, message, fix in conflicts(spec):
        fail(spec, key, message, fix)
    for name, cfg in spec.modes.items():
        if mode(name).validate:
            mode(name).validate(spec, cfg)


def check_inference(spec) -> None:
    m, p, w = spec.model, spec.parallel, spec.workload
    for key in ("batch_sizes", "prompt_lengths", "gen_lengths"):
        values, least = getattr(w, key), 0 if key == "gen_lengths" else 1
        if not values or min(values) < least:
            fail(spec, f"workload.{key}", f"{key} must be a non-empty list of integers >= {least}, got {values}.",
                  f"write e.g. {key} = [{max(least, 1)}].")
    longest = max(w.prompt_lengths) + max(w.gen_lengths)
    if longest > m.max_sequence_length:
        fail(spec, "workload.prompt_lengths", f"prompt {max(w.prompt_lengths)} + generated {max(w.gen_lengths)} "
              f"tokens exceed the model's max_sequence_length {m.max_sequence_length}.",
              f"shorten the grid or raise model.max_sequence_length to {longest} (RoPE has no fixed length).")
    if w.repeats < 1 or w.warmup_repeats < 0:
        fail(spec, "workload.repeats", f"repeats must be >= 1 and warmup_repeats >= 0, got {w.repeats} and "
              f"{w.warmup_repeats}.", "set e.g. repeats = 10, warmup_repeats = 2.")
    if p.dp is not None and not spec.modes and p.dp != 1:  # a parallel mode checks its own use of dp
        fail(spec, "parallel.dp", f"inference measures one model replica; dp {p.dp} would run copies.",
              "remove dp.")
    if (p.vpp or 1) > 1 or p.sequence_parallel:
        fail(spec, "parallel.vpp" if (p.vpp or 1) > 1 else "parallel.sequence_parallel",
              "inference runs plain pipeline stages without sequence parallelism (a decode step has one token).",
              "remove vpp and set sequence_parallel = false.")
    trained = [name for name in spec.tricks if "inference" not in trick(name).kinds]
    if trained:
        fail(spec, "tricks", f"techniques {', '.join(trained)} change training; inference runs the plain "
              "model.", "remove the [tricks.*] sections from inference variants.")


def check_accuracy(spec) -> None:
    p = spec.parallel
    for key, value in (("tp", p.tp), ("pp", p.pp), ("dp", p.dp or 1), ("vpp", p.vpp or 1)):
        if value != 1:
            fail(spec, f"parallel.{key}", f"the accuracy workload runs on one process (a parallel mode's "
                  f"function is computed on one device); {key} = {value}.", f"remove {key}.")
    if spec.data.source not in ("text", "jsonl", "hf"):
        fail(spec, "data.source", f"the accuracy workload scores held-out real text; source is "
              f"'{spec.data.source}'.", 'set [data] source = "text" (or "jsonl") and a path.')
    for i, task in enumerate(spec.eval.tasks):
        path = Path(spec.file).parent / task
        problem = file_problem(path)
        if problem:
            fail(spec, f"eval.tasks[{i}]", f"no task file at {path}." if problem.endswith("does not exist")
                 else f"cannot use the task file: {problem}.",
                 "give JSON-lines files of {context, choices, label}, relative to the scenario file.")
        check_text(spec, path, f"eval.tasks[{i}]", "task file")  # the JSON lines are parsed when scored
    check_eval_text(spec)
    if spec.tricks:
        fail(spec, "tricks", f"techniques {', '.join(spec.tricks)} change training; the accuracy workload "
              "evaluates a model.", "remove the [tricks.*] sections from accuracy variants.")
    if spec.workload.save_checkpoint and not spec.modes:  # a mode saves what its own fine-tune changed
        fail(spec, "workload.save_checkpoint", "the accuracy workload changes no weights unless a parallel mode "
              "fine-tunes them, so there is nothing new to save.",
              "remove save_checkpoint, or fine-tune in the variant's parallel mode.")


def check_eval_text(spec) -> None:
    """[eval] text: a readable UTF-8 file; text_stride within seq_length (and only with text)."""
    e, seq = spec.eval, spec.workload.seq_length
    if e.text_stride is not None and e.text is None:
        fail(spec, "eval.text_stride", "text_stride moves the windows over [eval] text, which is not set.",
             'set text = "PATH" or remove text_stride.')
    if e.text is None:
        return
    if e.text_stride is not None and e.text_stride > seq:
        fail(spec, "eval.text_stride", f"text_stride {e.text_stride} exceeds seq_length {seq}: tokens between "
             "windows would never be scored.", f"set text_stride between 1 and {seq}.")
    path = Path(spec.file).parent / e.text
    problem = file_problem(path)
    if problem:
        fail(spec, "eval.text", f"no text file at {path}." if problem.endswith("does not exist") else
             f"cannot read the text file: {problem}.", "give a UTF-8 text file, relative to the scenario file.")
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        fail(spec, "eval.text", f"{path} is not UTF-8 (byte {err.start}: {err.reason}).",
             "convert the file to UTF-8 (e.g. iconv -t UTF-8).")


def check_target(spec) -> None:
    w = spec.workload
    if w.target_loss is not None and w.eval_interval < 1:
        fail(spec, "workload.target_loss", "a target loss is checked at validations, and eval_interval is 0.",
              "set eval_interval to a number of steps, e.g. 50.")
    if w.target_loss is not None and not spec.eval.validation:
        fail(spec, "workload.target_loss", "a target loss needs validation, and eval.validation is false.",
              "set [eval] validation = true.")


def check_batch(spec, dp: int) -> None:
    w = spec.workload
    if w.global_batch % (w.micro_batch * dp):
        fail(spec, "workload.global_batch", f"global_batch {w.global_batch} is not divisible by micro_batch "
              f"{w.micro_batch} x dp {dp}.",
              f"use a global_batch that is a multiple of {w.micro_batch * dp}.")


def check_world(spec, world: int) -> None:
    """Checks that need the launched world size (tp * pp * dp must equal it)."""
    p = spec.parallel
    if spec.workload.kind in ("inference", "accuracy"):
        need = spec.world_size()
        if world != need:
            widths = "".join(f" x {mode(m).width}" for m in spec.modes if mode(m).width)
            size = f"tp x pp{widths} = {need}" if spec.workload.kind == "inference" else str(need)
            fail(spec, "parallel", f"{spec.workload.kind} runs one model on {size} process(es), "
                  f"but {world} were launched.", f"launch {need} (`python -m suite run` sizes each variant itself).")
        return
    if p.dp is not None and p.tp * p.pp * p.dp != world:
        fail(spec, "parallel.dp", f"tp {p.tp} x pp {p.pp} x dp {p.dp} = {p.tp * p.pp * p.dp} GPUs, "
              f"but {world} processes were launched.",
              f"launch {p.tp * p.pp * p.dp} processes, or remove dp so it is derived.")
    if world % (p.tp * p.pp):
        fail(spec, "parallel", f"world size {world} is not divisible by tp {p.tp} x pp {p.pp}.",
              f"launch a multiple of {p.tp * p.pp} processes.")
    check_batch(spec, world // (p.tp * p.pp))
