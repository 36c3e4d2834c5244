"""Kernel back-ends (suite.models.kernels): 'fused' and 'compile' compute the function 'torch' computes.

The megatron-core checks run in ONE worker subprocess (``python THIS_FILE --worker``; see
tests/check_worker.py), in fp32 on CPU, on a 2-layer h=64 model (tests/scenarios/kernels/tiny.toml):

* forward loss and every parameter's gradient of each back-end against 'torch': loss within 1e-6
  relative, gradients within 1e-5 of the largest gradient of the same tensor (fp32 reassociation in the
  fused SwiGLU and inductor's kernels; measured ~3e-7);
* torch's AdamW with the param groups switched to ``fused`` (what ``kernels.fuse_optimizer`` does) takes
  the fused kernel and the same step as the foreach one (1e-6 relative);
* the training workload's ``Trainer`` for 'torch', 'fused' and 'compile': the same losses (1e-5
  relative) and parameters after 4 steps, and random-LTD's variable kept lengths under 'compile'
  give the eager losses too;
* fp8's float8 linears under 'fused': their weight gradients added into main_grad by the suite's op
  train the weights of megatron's hook-side add, bit for bit;
* ``torch._dynamo.explain`` of one local-spec layer as 'compile' builds it: one graph, no break;
* 'compile''s LM-head loss (``kernels.language_model_loss``, compiled) against megatron's fused
  cross-entropy on bf16 logits: per-token losses within 1e-6 relative, the logits' gradient within a bf16
  rounding (8e-3 of its largest value).

Compilation on CPU costs seconds per graph (inductor writes C++): the file took 55 s from a cold inductor
cache and 20 s once ``/tmp/torchinductor_*`` held the graphs (2 shared cores).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from check_worker import result, run_worker, worker_main

SCENARIO = Path(__file__).resolve().parent / "scenarios" / "kernels" / "tiny.toml"
LOSS_RTOL = 1e-6
GRAD_TOL = 1e-5  # of the largest |gradient| of the same tensor
TRAIN_RTOL = 1e-5
ADAM_RTOL = 1e-6
RLTD = ["tricks.random_ltd.min_kept=8", "tricks.random_ltd.step_size=8", "tricks.random_ltd.schedule_steps=3",
        "tricks.random_ltd.layers=[1]"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("kernels_worker"), 600)


# --- run in the worker subprocess -------------------------------------------------------------------

def _spec(kernels: str, *overrides: str):
    from suite.scenario import load_scenario

    (v,) = load_scenario(SCENARIO, [f"model.kernels={kernels}", *overrides], only=["torch"])
    return v


def _batch(spec):
    import torch

    from suite.data.tokens import TokenSource

    batch = TokenSource(spec).train_batch(0, spec.workload.micro_batch)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    return tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), labels


def check_forward_backward(folder):
    """Per back-end: loss, per-tensor max gradient difference to 'torch' (relative to its max), and the
    switches the back-end set."""
    from suite.models.build import build

    out, ref = {}, None
    for name in ("torch", "fused", "compile"):
        spec = _spec(name)
        built = build(spec)
        tokens, positions, labels = _batch(spec)
        loss = built.model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in built.model.named_parameters()}
        if ref is None:
            ref = (float(loss), grads)
        c = built.config
        out[name] = {
            "loss": float(loss), "loss_rel": abs(float(loss) - ref[0]) / abs(ref[0]),
            "grad_rel": max(float((g - ref[1][n]).abs().max() / ref[1][n].abs().max()) for n, g in grads.items()),
            "grads": len(grads), "swiglu_fused": c.bias_activation_fusion, "ce_fused": c.cross_entropy_loss_fusion,
            "compiled": sum(getattr(m, "_compiled_call_impl", None) is not None for m in built.model.modules()),
            "loss_compiled": "compute_language_model_loss" in vars(built.model),
        }
    return out


def check_fused_adamw_step(folder):
    """The foreach AdamW megatron builds, and the same optimizer with its groups switched to fused."""
    import torch
    import torch.optim.adam as adam_module

    calls = []
    real = adam_module._fused_adam

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    params = {}
    adam_module._fused_adam = counting
    try:
        for fused in (False, True):
            ps = [torch.nn.Parameter(x.clone()) for x in start]
            opt = torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
                                    lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
            if fused:  # as kernels.fuse_optimizer does, after construction
                for group in opt.param_groups:
                    group["fused"], group["foreach"] = True, False
            for step_grads in grads:
                for p, g in zip(ps, step_grads):
                    p.grad = g.clone()
                opt.step()
            params[fused] = [p.detach() for p in ps]
    finally:
        adam_module._fused_adam = real
    rel = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(params[True], params[False]))
    moved = min(float((a - s).abs().max()) for a, s in zip(params[False], start))
    return {"fused_calls": len(calls), "rel": rel, "moved": moved}


def _train(spec, steps: int):
    from suite.launch.spmd import RankContext
    from suite.models import kernels
    from suite.workloads.train import Trainer

    trainer = Trainer(spec, RankContext(0, 1, 0))
    inner = kernels.torch_optimizers(trainer.optimizer)
    losses = [float(trainer.train_step(step)) for step in range(steps)]
    params = {n: p.detach().clone() for m in trainer.model for n, p in m.named_parameters()}
    fused = [g.get("fused") for o in inner for g in o.param_groups]
    kept = [h[1] for t in trainer.tricks for h in t.state.history]  # random-LTD's kept lengths
    return losses, params, fused, kept, _weights_into_main_grad(trainer.model)


def _weights_into_main_grad(chunks) -> dict:
    """How many linear weights the last step's GEMMs accumulated into main_grad, of how many."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    weights = [m.weight for c in chunks for m in c.modules()
               if (isinstance(m, ColumnParallelLinear | RowParallelLinear) or hasattr(m, "weight_grad_into_main_grad"))
               and m.weight is not None]  # megatron's linears and fp8's float8 ones
    return {"linears": len(weights), "fused": sum(bool(getattr(w, "grad_added_to_main_grad", False))
                                                  for w in weights)}


def check_training(folder):
    """Trainer steps per back-end, and random-LTD (kept 8 -> 16 -> 24 -> 32 tokens) eager and compiled."""
    from suite.models import kernels

    out = {}
    runs = [(name, name, ()) for name in ("torch", "fused", "compile")]
    runs += [("rltd_torch", "torch", RLTD), ("rltd_compile", "compile", RLTD)]
    refs = {}
    for label, name, overrides in runs:
        spec = _spec(name, *overrides)
        losses, params, fused, kept, wgrad = _train(spec, spec.workload.steps)
        base = refs.setdefault(bool(overrides), (losses, params))
        out[label] = {
            "losses": losses, "fused_groups": fused, "kept": kept, "wgrad": wgrad,
            "compile": kernels.compile_stats(spec),
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, base[0])),
            "param_rel": max(float((p - base[1][n]).abs().max() / base[1][n].abs().max()) for n, p in params.items()),
        }
    return out


def check_fp8_weight_gradients(folder):
    """fp8 (torchao's float8 linears, emulated on CPU) under 'fused': with the float8 weights' gradients
    added into main_grad by ``kernels.weight_into_main_grad``, and with that switched off (megatron's DDP
    hook adds them): the same additions in the same order, so the same losses and weights, bit for bit."""
    from suite.models import kernels

    spec = _spec("fused", "workload.precision=fp8")
    losses, params, _, _, wgrad = _train(spec, spec.workload.steps)
    real = kernels.weight_into_main_grad
    kernels.weight_into_main_grad = lambda weight: weight
    try:
        hook_losses, hook_params, _, _, hook_wgrad = _train(spec, spec.workload.steps)
    finally:
        kernels.weight_into_main_grad = real
    return {"losses": losses, "hook_losses": hook_losses, "wgrad": wgrad, "hook_wgrad": hook_wgrad,
            "param_diff": max(float((p.float() - hook_params[n].float()).abs().max()) for n, p in params.items())}


def check_graph_breaks(folder):
    """torch._dynamo.explain of one layer's forward (training mode, RoPE as GPTModel passes it), as the
    'compile' back-end builds it (``kernels.compile_layers`` silences megatron's warnings in graphs)."""
    import torch
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from suite.models.build import build

    spec = _spec("compile")
    model = build(spec).model
    layer = next(m for m in model.modules() if isinstance(m, TransformerLayer))
    s, b, h = spec.workload.seq_length, spec.workload.micro_batch, spec.model.hidden_size
    hidden = torch.randn(s, b, h, requires_grad=True)
    rope = model.rotary_pos_emb(s)
    torch._dynamo.reset()
    e = torch._dynamo.explain(layer.forward)(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rope)
    return {"graphs": e.graph_count, "breaks": e.graph_break_count,
            "reasons": sorted({str(r.reason).splitlines()[0] for r in e.break_reasons})}


def check_compiled_loss_in_bf16(folder):
    """``kernels.language_model_loss`` compiled against megatron's fused cross-entropy (the one 'fused' and
    'compile' at tp > 1 use) on bf16 logits [s, b, vocab]: the per-token losses and the logits' gradient."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from suite.models import kernels

    g = torch.Generator().manual_seed(0)
    s, b, vocab = 48, 3, 1000
    logits = (torch.randn(s, b, vocab, generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    weights = torch.rand(b, s, generator=g)  # a loss weighting per token, so each token's gradient counts
    out = {}
    for name, loss_fn in (("megatron", None), ("compiled", torch.compile(kernels.language_model_loss))):
        x = logits.clone().requires_grad_()
        if loss_fn is None:  # megatron's compute_language_model_loss with the native fusion
            loss = fused_vocab_parallel_cross_entropy(x, labels.t().contiguous(),
                                                      ps.get_tensor_model_parallel_group()).t()
        else:
            loss = loss_fn(labels, x)
        (loss * weights).sum().backward()
        out[name] = (loss.detach().float(), x.grad.float())
    (ref_loss, ref_grad), (loss, grad) = out["megatron"], out["compiled"]
    return {"shape": list(loss.shape), "loss_rel": float((loss - ref_loss).abs().max() / ref_loss.abs().max()),
            "grad_rel": float((grad - ref_grad).abs().max() / ref_grad.abs().max()),
            "grad_dtype": str(out["compiled"][1].dtype)}


CHECKS = [check_forward_backward, check_fused_adamw_step, check_training, check_fp8_weight_gradients,
          check_graph_breaks, check_compiled_loss_in_bf16]

if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3]))


# --- pytest: assertions on the worker's results -----------------------------------------------------

def test_backends_compute_the_reference_loss_and_gradients(worker):
    r = result(worker, "forward_backward")
    for name in ("fused", "compile"):
        assert r[name]["loss_rel"] <= LOSS_RTOL, (name, r[name]["loss"], r["torch"]["loss"])
        assert r[name]["grad_rel"] <= GRAD_TOL, (name, r[name]["grad_rel"])
        assert r[name]["grads"] == r["torch"]["grads"]


def test_backends_switch_what_they_say(worker):
    r = result(worker, "forward_backward")
    assert not r["torch"]["swiglu_fused"] and r["torch"]["compiled"] == 0
    assert r["fused"]["swiglu_fused"] and r["fused"]["compiled"] == 0
    assert r["compile"]["swiglu_fused"] and r["compile"]["compiled"] == 2  # both layers
    assert [r[name]["loss_compiled"] for name in ("torch", "fused", "compile")] == [False, False, True]
    # fp32 weights: megatron's fused cross-entropy would round the logits' gradient to bf16
    assert not any(r[name]["ce_fused"] for name in r)


def test_compiled_loss_equals_megatrons_fused_cross_entropy_in_bf16(worker):
    r = result(worker, "compiled_loss_in_bf16")
    assert r["shape"] == [3, 48], r  # [b, s], as megatron returns it
    assert r["loss_rel"] <= 1e-6, r  # both in fp32 from the same bf16 logits
    assert r["grad_rel"] <= 8e-3, r  # the gradient rounds to bf16 (2^-8 relative) in both


def test_fused_adamw_step_equals_the_foreach_step(worker):
    r = result(worker, "fused_adamw_step")
    assert r["fused_calls"] == 6  # the switched optimizer took torch's fused kernel: 3 steps x 2 groups
    assert r["moved"] > 1e-3 and r["rel"] <= ADAM_RTOL, r


def test_training_losses_and_weights_match_torch(worker):
    r = result(worker, "training")
    assert r["torch"]["fused_groups"] and not any(r["torch"]["fused_groups"])
    assert r["torch"]["wgrad"]["fused"] == 0 and r["torch"]["wgrad"]["linears"] >= 9  # 2 layers x 4 + LM head
    for name in ("fused", "compile", "rltd_compile"):
        assert all(r[name]["fused_groups"]), name  # the Trainer's AdamW runs fused
        # every weight gradient went into megatron's main_grad through its GEMM, and the DDP hook did not add
        # the placeholder gradient on top (the weights below would differ)
        assert r[name]["wgrad"]["fused"] == r[name]["wgrad"]["linears"] == r["torch"]["wgrad"]["linears"], name
        assert r[name]["loss_rel"] <= TRAIN_RTOL and r[name]["param_rel"] <= TRAIN_RTOL, (name, r[name], r["torch"])
    # the custom op and the flag megatron's hook reads stay inside the compiled graphs
    assert r["compile"]["compile"]["graph_breaks"] == 0 and r["rltd_compile"]["compile"]["graph_breaks"] == 0, r


def test_random_ltd_trains_the_same_under_compile(worker):
    r = result(worker, "training")
    assert r["rltd_torch"]["kept"] == [8, 16, 24, 32]  # every step a new sequence length for layer 1
    assert r["rltd_compile"]["kept"] == r["rltd_torch"]["kept"]
    assert r["rltd_compile"]["loss_rel"] <= TRAIN_RTOL and r["rltd_compile"]["param_rel"] <= TRAIN_RTOL, r


def test_fp8_weight_gradients_go_into_main_grad_once(worker):
    r = result(worker, "fp8_weight_gradients")
    # 2 layers x 4 float8 linears + the LM head, all into main_grad; with the float8 path off only the LM head
    assert r["wgrad"] == {"linears": 9, "fused": 9} and r["hook_wgrad"] == {"linears": 9, "fused": 1}, r
    assert r["losses"] == r["hook_losses"] and r["param_diff"] == 0.0, r


def test_a_compiled_layer_is_one_graph(worker):
    """Without kernels.py's warnings substitution, megatron's deprecation warning breaks it into 9."""
    r = result(worker, "graph_breaks")
    assert (r["graphs"], r["breaks"]) == (1, 0), r["reasons"]


def _torchrun_metrics(tmp_path, name: str, *sets: str) -> dict:
    """The metrics of variant ``name`` of the test scenario run over two CPU processes."""
    from check_worker import torchrun

    args = [a for kv in sets for a in ("--set", kv)]
    proc = torchrun("-m", "suite", "run", str(SCENARIO), "--variant", name, *args, "--out", str(tmp_path / name),
                    timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [rec] = [json.loads(line) for line in (tmp_path / name / "records.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok" and rec["world_size"] == 2, rec.get("error")
    return rec["metrics"]


def _same_training(a: dict, b: dict) -> None:
    for (_, x), (_, y) in zip(a["loss_curve"], b["loss_curve"], strict=True):
        assert x == pytest.approx(y, rel=TRAIN_RTOL)
    assert a["validation_loss"] == pytest.approx(b["validation_loss"], rel=TRAIN_RTOL)


def test_tensor_parallel_layers_compile_to_one_graph_and_train_the_same(tmp_path):
    """tp = 2 over two CPU processes: the compiled layers make no graph break (megatron's asynchronous
    input-gradient all-reduce, whose backward dynamo cannot trace, split each layer into pieces run from
    Python), and train the losses and validation loss of the eager back-end."""
    runs = {name: _torchrun_metrics(tmp_path, name, "parallel.tp=2") for name in ("torch", "compile")}
    assert runs["torch"]["compile"] is None
    stats = runs["compile"]["compile"]
    assert stats["graph_breaks"] == 0 and stats["graphs"] >= 2, stats
    _same_training(runs["compile"], runs["torch"])


def test_pipeline_stages_accumulate_weight_gradients_the_same(tmp_path):
    """pp = 2 with 4 micro-batches in flight: each stage's fused weight-gradient accumulation (``fused``)
    trains the losses of megatron's hook-side accumulation (``torch``)."""
    sets = ("parallel.pp=2", "workload.global_batch=8")
    _same_training(_torchrun_metrics(tmp_path, "fused", *sets), _torchrun_metrics(tmp_path, "torch", *sets))


@pytest.mark.parametrize("tuning, options", [("default", None),
                                             ("coordinate_descent", {"coordinate_descent_tuning": True})])
def test_kernel_tuning_reaches_every_compiled_layer(monkeypatch, tuning, options):
    """``[model] kernel_tuning`` becomes the inductor options of each layer's torch.compile: the whole layer,
    and the two halves of a technique's layer that keeps its own forward."""
    from types import SimpleNamespace

    import torch
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from suite.models import kernels

    class TechniqueLayer(TransformerLayer):
        def forward(self, *args, **kwargs):
            return None

    def bare(cls):  # an nn.Module of the class, without megatron's construction
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer._forward_attention = layer._forward_mlp = lambda *a, **k: None
        return layer

    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    chunk = torch.nn.ModuleList([bare(TransformerLayer), bare(TechniqueLayer)])
    spec = SimpleNamespace(model=SimpleNamespace(kernels="compile", kernel_tuning=tuning))
    assert kernels.compile_layers(spec, [chunk]) == 2
    assert calls == [{"dynamic": None, "options": options}] * 3  # one whole layer, two halves
