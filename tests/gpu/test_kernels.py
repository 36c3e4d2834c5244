"""Kernel back-ends on CUDA in bf16 (suite.models.kernels): 'fused' and 'compile' against 'torch'.

The megatron-core checks run in two worker subprocesses (``python THIS_FILE --worker small|big OUT DIR``):
megatron's parallel_state is process-global, so it must not leak into other test files. Each worker is a
world of one over NCCL on GPU 0, without the CPU compat layer.

Tolerances (bf16 weights in the forward, fp32 master weights and gradient buffers; the back-ends round
in different places: the fused SwiGLU and cross-entropy keep fp32 inside a kernel, inductor fuses the
norm and RoPE arithmetic):

* one forward/backward of the 2-layer test model (tests/scenarios/kernels/tiny.toml, bf16): loss within
  1e-2 relative, every parameter's gradient at cosine similarity >= 0.999 to 'torch';
* 4 training steps of the same model: losses within 1e-2 relative; random-LTD's changing kept lengths
  under 'compile' too, and 'compile' with full and with selective activation recompute (CUDA only in
  megatron-core);
* a ~134M model (preset gpt-base, 12 x 768, seq 1024, micro-batch 8, the built-in text as bytes) trained
  8 steps with 'torch' and with 'compile': losses within 2e-2 relative. Not a timed test: the step times
  are printed (``-s``) for the reports; the assertion is that compile runs and learns the same.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the worker harness, in the worker too
from check_worker import result, run_worker, worker_main  # noqa: E402

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "tests" / "scenarios" / "kernels" / "tiny.toml"
LOSS_RTOL = 1e-2
GRAD_COSINE = 0.999
BIG_LOSS_RTOL = 2e-2
RLTD = ["tricks.random_ltd.min_kept=8", "tricks.random_ltd.step_size=8", "tricks.random_ltd.schedule_steps=3",
        "tricks.random_ltd.layers=[1]"]
BIG = ["model.preset=gpt-base", "model.num_layers=12", "workload.seq_length=1024", "workload.micro_batch=8",
       "workload.global_batch=8", "workload.steps=8", "workload.warmup_steps=3", "workload.lr=6e-4",
       "workload.min_lr=6e-5", "workload.lr_warmup_steps=2", "data.source=text", "data.path=builtin:shakespeare"]


def _run_worker(folder: Path, group: str) -> dict:
    return run_worker(__file__, folder, 300, group)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The test model's checks (one subprocess)."""
    return _run_worker(tmp_path_factory.mktemp("kernels_gpu_small"), "small")


@pytest.fixture(scope="module")
def big_worker(tmp_path_factory):
    """The 134M model's check (another subprocess, so each test's share stays under two minutes)."""
    return _run_worker(tmp_path_factory.mktemp("kernels_gpu_big"), "big")



# --- run in the worker subprocess -------------------------------------------------------------------

def _spec(kernels: str, *overrides: str):
    from suite.scenario import load_scenario

    (v,) = load_scenario(SCENARIO, [f"model.kernels={kernels}", "workload.precision=bf16", *overrides],
                         only=["torch"])
    return v


def check_forward_backward(folder):
    """Per back-end, bf16 as training runs it (Float16Module): loss, the lowest per-tensor gradient cosine
    similarity to 'torch', and the switches the back-end set."""
    import torch
    from megatron.core.transformer.module import Float16Module

    from suite.data.tokens import TokenSource
    from suite.models.build import build

    out, ref = {}, None
    for name in ("torch", "fused", "compile"):
        spec = _spec(name)
        built = build(spec)
        model = Float16Module(built.config, built.model)
        batch = TokenSource(spec).train_batch(0, spec.workload.micro_batch).cuda()
        tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        positions = torch.arange(tokens.shape[1], device="cuda").unsqueeze(0).expand_as(tokens)
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        grads = {n: p.grad.detach().float().flatten() for n, p in model.named_parameters()}
        if ref is None:
            ref = (float(loss), grads)
        c = built.config
        out[name] = {
            "loss": float(loss), "loss_rel": abs(float(loss) - ref[0]) / abs(ref[0]),
            "cosine": min(float(torch.nn.functional.cosine_similarity(g, ref[1][n], dim=0)) for n, g in grads.items()),
            "swiglu_fused": c.bias_activation_fusion, "ce_fused": c.cross_entropy_loss_fusion,
        }
    return out


def _train(spec):
    import torch

    from suite.launch.spmd import RankContext
    from suite.models import kernels
    from suite.workloads.train import Trainer

    trainer = Trainer(spec, RankContext(0, 1, 0))
    fused = [g.get("fused") for o in kernels.torch_optimizers(trainer.optimizer) for g in o.param_groups]
    losses, times = [], []
    for step in range(spec.workload.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(float(trainer.train_step(step)))  # the read-back synchronises
        times.append(time.perf_counter() - started)
    timed = sorted(times[spec.workload.warmup_steps:])
    return {"losses": losses, "fused_groups": fused, "first_step_s": times[0],
            "median_step_ms": 1000 * timed[len(timed) // 2],
            "kept": [h[1] for t in trainer.tricks for h in t.state.history]}


def check_training(folder):
    """4 bf16 steps of the test model per back-end, and random-LTD eager and compiled."""
    out = {}
    for label, name, overrides in [("torch", "torch", ()), ("fused", "fused", ()), ("compile", "compile", ()),
                                   ("rltd_torch", "torch", RLTD), ("rltd_compile", "compile", RLTD)]:
        out[label] = _train(_spec(name, *overrides))
    return out


def check_recompute(folder):
    """'compile' with megatron's activation recompute (CUDA only): 'full' re-runs each compiled layer in
    the backward, 'selective' checkpoints the core attention inside the compiled layer. Each separately,
    so that one failing does not hide the other."""
    out = {"torch": _train(_spec("torch"))}
    for mode in ("full", "selective"):
        try:
            out[mode] = _train(_spec("compile", f"parallel.recompute={mode}"))
        except Exception as e:  # reported to the test, which fails with it
            out[mode] = {"error": f"{type(e).__name__}: {e}"}
    return out


def check_big_model(folder):
    """A ~134M model, 'torch' then 'compile': losses and step times."""
    return {name: _train(_spec(name, *BIG)) for name in ("torch", "compile")}


CHECKS = {"small": [check_forward_backward, check_training, check_recompute], "big": [check_big_model]}


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS[sys.argv[4]], sys.argv[2], sys.argv[3], cuda=True))


# --- pytest: assertions on the worker's results -----------------------------------------------------

def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_backends_compute_the_reference_loss_and_gradients_in_bf16(worker):
    r = result(worker, "forward_backward")
    assert not r["torch"]["swiglu_fused"] and not r["torch"]["ce_fused"]
    for name in ("fused", "compile"):
        assert r[name]["swiglu_fused"] and r[name]["ce_fused"], name  # bf16 weights: both megatron fusions
        assert r[name]["loss_rel"] <= LOSS_RTOL, (name, r[name], r["torch"])
        assert r[name]["cosine"] >= GRAD_COSINE, (name, r[name])


def test_training_losses_match_torch_in_bf16(worker):
    r = result(worker, "training")
    assert not any(r["torch"]["fused_groups"])
    for name in ("fused", "compile"):
        assert r[name]["fused_groups"] and all(r[name]["fused_groups"]), name  # torch's fused AdamW on CUDA
        assert _rel(r[name]["losses"], r["torch"]["losses"]) <= LOSS_RTOL, (name, r[name], r["torch"])
    assert r["rltd_compile"]["kept"] == r["rltd_torch"]["kept"] == [8, 16, 24, 32]
    assert _rel(r["rltd_compile"]["losses"], r["rltd_torch"]["losses"]) <= LOSS_RTOL, r


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compile_with_recompute_trains_like_torch(worker, mode):
    r = result(worker, "recompute")
    assert "error" not in r[mode], r[mode]["error"]
    assert _rel(r[mode]["losses"], r["torch"]["losses"]) <= LOSS_RTOL, (r[mode], r["torch"])


def test_compile_trains_a_134m_model_like_torch(big_worker):
    r = result(big_worker, "big_model")
    print(f"\ngpt-base 12x768, 8 x 1024 tokens a step, bf16: median step torch {r['torch']['median_step_ms']:.1f} ms, "
          f"compile {r['compile']['median_step_ms']:.1f} ms (first step {r['torch']['first_step_s']:.1f} s / "
          f"{r['compile']['first_step_s']:.1f} s)")
    assert _rel(r["compile"]["losses"], r["torch"]["losses"]) <= BIG_LOSS_RTOL, r
    assert r["compile"]["losses"][-1] < r["compile"]["losses"][0]  # it learns


def test_weight_gradient_accumulates_into_fp32_in_the_gemm():
    """kernels.accumulate_weight_grad_ on CUDA: bf16 operands summed into an fp32 buffer (a view into a
    larger one, as megatron's DDP hands out) in place. Against an fp64 reference it must keep fp32's
    accuracy, which megatron's unfused path (a bf16 weight gradient, then the add) cannot: that path's
    error is the yardstick that shows the check can tell the two apart."""
    import torch

    from suite.models.kernels import accumulate_weight_grad_

    gen = torch.Generator(device="cuda").manual_seed(0)
    out_f, in_f, tokens = 512, 256, 4096
    buffer = torch.randn(out_f * in_f + 100, device="cuda", generator=gen)
    main_grad = buffer[100:].view(out_f, in_f)
    x = torch.randn(tokens, in_f, device="cuda", generator=gen).bfloat16()
    g = torch.randn(tokens, out_f, device="cuda", generator=gen).bfloat16()
    exact = main_grad.double() + g.double().t() @ x.double()
    unfused = main_grad + (g.t() @ x).float()
    before = main_grad.data_ptr()
    accumulate_weight_grad_(main_grad, x, g)

    def err(t):
        return float((t.double() - exact).abs().max() / exact.abs().max())

    assert main_grad.data_ptr() == before and main_grad.dtype == torch.float32
    assert float(buffer[:100].abs().sum()) > 0 and torch.equal(buffer[100:].view(out_f, in_f), main_grad)
    assert err(main_grad) <= 1e-5 < 1e-4 <= err(unfused), (err(main_grad), err(unfused))


@pytest.mark.parametrize("numel", [1, 4095, 4097, 2048 * 5632])  # partial and whole blocks, fc2's weight
def test_float8_weight_gradient_adds_into_main_grad_exactly(numel):
    """kernels.add_into_main_grad on CUDA (the Triton kernel fp8's weights use): fp32 += bf16 gives what
    megatron's hook gives (``main_grad.add_(grad)``), bit for bit, in place in a view into a larger buffer,
    leaving the buffer's other elements alone."""
    import torch

    from suite.models.kernels import add_into_main_grad

    gen = torch.Generator(device="cuda").manual_seed(0)
    buffer = torch.randn(numel + 200, device="cuda", generator=gen)
    main_grad = buffer[100:100 + numel]
    grad = torch.randn(numel, device="cuda", generator=gen).bfloat16()
    expected, outside = main_grad.clone().add_(grad), torch.cat([buffer[:100], buffer[100 + numel:]])
    add_into_main_grad(main_grad, grad)
    assert torch.equal(main_grad, expected)
    assert torch.equal(torch.cat([buffer[:100], buffer[100 + numel:]]), outside)
