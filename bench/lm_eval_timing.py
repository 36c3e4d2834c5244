"""How long lm-evaluation-harness takes through suite's LM adapter on one GPU: a 1,000-example
multiple-choice task for the 28 M model of scenarios/pretrain_small.toml and a LLaMA-7B-shaped model
(scenarios/llama7b_cqil.toml's preset), both bf16 with random weights (time does not depend on them).

Self-contained: the task is synthetic (HellaSwag-like lengths: a 100-token context and 4 endings of
30 tokens, one token a byte, so 4,000 loglikelihood requests of ~131 tokens), written as JSON lines
with a task YAML into a temporary folder; nothing is downloaded. With lm_eval importable the timed
call is ``lm_eval.simple_evaluate`` over that task (the harness's own overhead included); without it,
the same requests go through ``suite.eval.multiple_choice``, which runs the same batched scorer
(``suite.eval.core.score``) the adapter's ``loglikelihood`` calls, and the JSON says ``"harness": false``.

Each model: one untimed warm-up pass over 64 examples, then the whole task timed (CUDA synchronised,
wall clock; ``model_seconds`` is the part spent in the model's forward calls, the rest is the harness,
dataset building and tokenizing); FLOPs = 2 x parameters x tokens fed (padding included) over the time, next to the GPU's
bf16 dense peak given by --peak-tflops (H200: 989).

    source bench/gpu_env.sh && python bench/lm_eval_timing.py            # -> $OUT/lm_eval_timing.json
    python bench/lm_eval_timing.py --models tiny --examples 20           # a CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from suite.eval.local_tasks import write_task  # noqa: E402

MODELS = {"pretrain_small": "scenarios/pretrain_small.toml", "llama7b": "scenarios/llama7b_cqil.toml",
          "tiny": "suite/defaults/tiny.toml"}


def write_mc_task(folder: Path, n: int, context: int, ending: int) -> Path:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    text = lambda k: "".join(rng.choice(letters) for _ in range(k)).strip() or "a"  # noqa: E731
    with open(folder / "task.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"context": text(context), "choices": [text(ending - 1) for _ in range(4)],
                                "label": rng.randrange(4)}) + "\n")
    write_task(folder / "task.yaml", "suite_timing_mc", folder / "task.jsonl")
    return folder / "task.jsonl"


def model_spec(name: str, precision: str):
    from suite.scenario import load_scenario
    from suite.scenario.schema import ParallelConfig

    spec = load_scenario(ROOT / MODELS[name])[0]
    m = dataclasses.replace(spec.model, init="random")
    w = dataclasses.replace(spec.workload, precision=precision, kind="accuracy")
    return dataclasses.replace(spec, model=m, workload=w, parallel=ParallelConfig(), tricks={})


def time_model(name: str, args, task: Path, folder: Path) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from suite.eval import ByteTokenizer, multiple_choice, read_examples
    from suite.eval.megatron_lm import MegatronLM
    from suite.metrics import flops as F
    from suite.models import gpt

    spec = model_spec(name, args.precision)
    ps.initialize_model_parallel()
    config = gpt.transformer_config(spec)
    chunks = gpt.build_chunks(spec, config)
    gpt.init_parameters(chunks, 0, spec.model.init_std, spec.model.num_layers)
    if config.bf16:
        chunks = [c.bfloat16() for c in chunks]
    inner = MegatronLM(chunks, config, spec.model.vocab_size)
    fed, in_model = [], []
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def model(tokens):
        fed.append(tokens.numel())
        sync()
        t = time.perf_counter()
        out = inner(tokens)
        sync()
        in_model.append(time.perf_counter() - t)
        return out

    examples = read_examples(task)
    multiple_choice(model, ByteTokenizer(), examples[:64], batch_size=args.batch_size)  # warm-up
    fed.clear()
    in_model.clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from suite.eval.lm_eval_adapter import SuiteLM

        harness = True
    except ImportError:
        harness = False
    sync()
    start = time.perf_counter()
    if harness:
        out = lm_eval.simple_evaluate(model=SuiteLM(model, ByteTokenizer(), max_length=spec.model.max_sequence_length,
                                                    batch_size=args.batch_size),
                                      tasks=["suite_timing_mc"], task_manager=TaskManager(include_path=str(folder)))
        acc = out["results"]["suite_timing_mc"]["acc,none"]
    else:
        acc = multiple_choice(model, ByteTokenizer(), examples, batch_size=args.batch_size)["acc"]
    sync()
    seconds = time.perf_counter() - start
    params = F.parameters(F.Shape.of(spec.model))["total"]
    tokens = sum(fed)
    tflops = 2 * params * tokens / seconds / 1e12
    model_seconds = sum(in_model)  # forward passes and log-softmax; the rest is the harness and tokenizing
    ps.destroy_model_parallel()
    del chunks, inner
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
    m = spec.model
    return {"model": name, "shape": {k: getattr(m, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                               "num_query_groups", "ffn_hidden_size", "vocab_size")},
            "parameters": params, "precision": args.precision, "harness": harness, "examples": len(examples),
            "requests": 4 * len(examples), "batch_size": args.batch_size, "seconds": seconds,
            "model_seconds": model_seconds, "forwards": len(fed),
            "examples_per_s": len(examples) / seconds, "tokens_fed": tokens, "tokens_per_s": tokens / seconds,
            "model_tflops": tflops, "mfu": tflops / args.peak_tflops if cuda else None,
            "peak_memory_bytes": peak if cuda else None, "acc": acc}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="pretrain_small,llama7b", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--context", type=int, default=100, help="context tokens (bytes) per example")
    p.add_argument("--ending", type=int, default=30, help="tokens (bytes) per choice, the delimiter included")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward (SuiteLM batch_size)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = torch.cuda.is_available()
    if not cuda:
        from suite.launch import cpu_compat

        cpu_compat.enable()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="lm_eval_timing_"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(folder / "cache"))
    task = write_mc_task(folder, args.examples, args.context, args.ending)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/pg", rank=0, world_size=1)
    results = []
    for name in args.models.split(","):
        r = time_model(name, args, task, folder)
        results.append(r)
        print(f"{name}: {r['parameters'] / 1e6:,.1f} M parameters, {r['examples']} examples "
              f"({r['requests']} requests) in {r['seconds']:.2f} s = {r['examples_per_s']:.1f} examples/s, "
              f"{r['tokens_per_s']:,.0f} tokens/s fed, {r['model_tflops']:.1f} TFLOP/s"
              f" [{r['model_seconds']:.2f} s in {r['forwards']} model calls]"
              + (f" ({100 * r['mfu']:.1f}% of {args.peak_tflops:g})" if r["mfu"] is not None else "")
              + f"; {'lm_eval.simple_evaluate' if r['harness'] else 'suite.eval.multiple_choice (no lm_eval)'}",
              flush=True)
    dist.destroy_process_group()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    record = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "task": {"examples": args.examples, "choices": 4, "context_tokens": args.context,
                       "ending_tokens": args.ending}, "results": results}
    (out_dir / "lm_eval_timing.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir / 'lm_eval_timing.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
