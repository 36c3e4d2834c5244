"""FP8 training on CUDA (suite.models.fp8): real float8 GEMMs (``torch._scaled_mm``) against the reference.

Needs compute capability >= 8.9 (H100/H200/L40S class); an older GPU is skipped with the reason. The
megatron-core checks run in ONE worker subprocess (``python THIS_FILE --worker OUT DIR``), a world of one
over NCCL on GPU 0, so megatron's process-global state does not leak into other test files.

What is checked, and the tolerances (e4m3 keeps 3 mantissa bits: a rounding error up to 6% per element;
e5m2, for output gradients, 2 bits; tensorwise-scaled GEMMs of random operands land within a few percent
of fp32 in relative Frobenius norm):

* one float8 layer of a 1B model's width (4096 tokens x 2048 -> 5632, bf16): output within 8% and input
  and weight gradients within 15% of the fp32 GEMMs, and its forward + backward run exactly three
  ``torch._scaled_mm`` (output, input gradient, weight gradient);
* the test model built with ``precision = "fp8"``: its 4 x L linear submodules are float8 layers, the LM
  head is not, one forward/backward runs 3 x 4 x L float8 GEMMs, and its loss is within 0.02 nats of the
  bf16 model's (same weights);
* a ~85M model (preset gpt-base, 12 x 768, byte vocabulary) trained 50 steps on the builtin corpus
  (16 x 512 tokens a step) in bf16 and in fp8: both learn, and the mean loss of the last 5 steps differs
  by less than 0.05 nats. Step times are printed (``-s``), not asserted.
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
SCENARIO = ROOT / "tests" / "scenarios" / "fp8" / "unit.toml"
FORWARD_TOL, GRAD_TOL = 0.08, 0.15
MODEL_LOSS_TOL = 0.02
TRAIN_LOSS_TOL = 0.05  # nats, mean of the last 5 of 50 steps
BIG = ["model.preset=gpt-base", "model.vocab_size=256", "model.max_sequence_length=512",
       "workload.seq_length=512", "workload.micro_batch=16", "workload.global_batch=16", "workload.steps=50",
       "workload.warmup_steps=5", "workload.lr=6e-4", "workload.min_lr=6e-5", "workload.lr_warmup_steps=10",
       'data.path="builtin:shakespeare_wikitext"']


def _capable() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    cc = torch.cuda.get_device_capability()
    return cc >= (8, 9), f"float8 tensor cores need compute capability >= 8.9, this GPU has {cc[0]}.{cc[1]}"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    ok, why = _capable()
    if not ok:
        pytest.skip(why)
    return run_worker(__file__, tmp_path_factory.mktemp("fp8_gpu_worker"), 600)


# --- run in the worker subprocess -------------------------------------------------------------------

def _spec(precision: str, *overrides: str):
    from suite.scenario import load_scenario

    (v,) = load_scenario(SCENARIO, [f"workload.precision={precision}", *overrides], only=["fp8"])
    return v


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _scaled_mm_calls(fn) -> int:
    """How many float8 GEMMs ``fn`` runs: calls of ``torch._scaled_mm`` (torchao's float8 matmul calls it
    through the module attribute, eager; counted on whichever thread autograd runs the backward)."""
    import torch

    real, calls = torch._scaled_mm, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    torch._scaled_mm = counting
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        torch._scaled_mm = real
    return len(calls)


def check_layer(folder):
    """One float8 layer (bf16 weights, the GPU's float8 GEMMs) against fp32 GEMMs of the same values."""
    from types import SimpleNamespace

    import torch

    from suite.models import fp8

    cfg = SimpleNamespace(use_cpu_initialization=False, params_dtype=torch.bfloat16)
    layer = fp8.Float8ColumnLinear(2048, 5632, config=cfg, bias=False, float8_config=fp8.float8_config())
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
    x = torch.randn(2048, 2, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2048, 2, 5632, device="cuda", dtype=torch.bfloat16)

    def step():
        y, _ = layer(x)
        y.backward(g)
        return y

    layer.weight.grad = x.grad = None
    calls = _scaled_mm_calls(step)
    layer.weight.grad = x.grad = None
    y = step()
    x_ref = x.detach().float().requires_grad_()
    w_ref = layer.weight.detach().float().requires_grad_()
    (x_ref @ w_ref.t()).backward(g.float())
    return {"emulate": layer.config.emulate, "scaled_mm_calls": calls,
            "forward": _rel(y, x_ref.detach() @ w_ref.detach().t()), "grad_input": _rel(x.grad, x_ref.grad), "grad_weight": _rel(layer.weight.grad, w_ref.grad)}


def check_model(folder):
    """The test model in fp8 against bf16: float8 layers, float8 GEMMs per step, the loss."""
    import torch
    from megatron.core.transformer.module import Float16Module

    from suite.data.tokens import TokenSource
    from suite.models import fp8
    from suite.models.build import build

    out = {}
    for precision in ("bf16", "fp8"):
        spec = _spec(precision)
        built = build(spec, log=lambda *a: None)
        model = Float16Module(built.config, built.model)
        batch = TokenSource(spec).train_batch(0, spec.workload.micro_batch).cuda()
        tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        positions = torch.arange(tokens.shape[1], device="cuda").unsqueeze(0).expand_as(tokens)
        losses = []

        def step():
            loss = model(tokens, positions, None, labels=labels).float().mean()
            loss.backward()
            losses.append(float(loss))

        calls = _scaled_mm_calls(step)
        out[precision] = {"loss": losses[0], "scaled_mm_calls": calls, "float8": fp8.float8_layers(built.model),
                          "layers": spec.model.num_layers}
    return out


def _train(spec):
    import torch

    from suite.launch.spmd import RankContext
    from suite.workloads.train import Trainer

    trainer = Trainer(spec, RankContext(0, 1, 0))
    losses, times = [], []
    for step in range(spec.workload.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(float(trainer.train_step(step)))  # the read-back synchronises
        times.append(time.perf_counter() - started)
    timed = sorted(times[spec.workload.warmup_steps:])
    return {"losses": losses, "median_step_ms": 1000 * timed[len(timed) // 2]}


def check_training(folder):
    """The ~85M model, 50 steps of real text, bf16 then fp8 from the same weights and batches."""
    return {precision: _train(_spec(precision, *BIG)) for precision in ("bf16", "fp8")}


CHECKS = [check_layer, check_model, check_training]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3], cuda=True))


# --- pytest: assertions on the worker's results -----------------------------------------------------

def test_float8_layer_runs_scaled_mm_and_matches_fp32(worker):
    r = result(worker, "layer")
    assert r["emulate"] is False and r["scaled_mm_calls"] == 3, r  # output, grad input, grad weight
    assert 1e-4 < r["forward"] < FORWARD_TOL, r  # > 1e-4: float8 rounding is really there
    assert 1e-4 < r["grad_input"] < GRAD_TOL and 1e-4 < r["grad_weight"] < GRAD_TOL, r


def test_fp8_model_has_float8_layers_and_tracks_bf16(worker):
    r = result(worker, "model")
    layers = r["fp8"]["layers"]
    assert len(r["fp8"]["float8"]) == 4 * layers and not r["bf16"]["float8"], r
    assert not any("output_layer" in n or "embedding" in n for n in r["fp8"]["float8"])
    assert r["fp8"]["scaled_mm_calls"] == 3 * 4 * layers and r["bf16"]["scaled_mm_calls"] == 0, r
    assert abs(r["fp8"]["loss"] - r["bf16"]["loss"]) < MODEL_LOSS_TOL, r


def test_fp8_training_loss_stays_within_bound_of_bf16(worker):
    r = result(worker, "training")
    bf16, fp8 = r["bf16"]["losses"], r["fp8"]["losses"]
    end_bf16, end_fp8 = sum(bf16[-5:]) / 5, sum(fp8[-5:]) / 5
    print(f"\ngpt-base 12x768 (byte vocabulary), 16 x 512 tokens a step, 50 steps: final loss bf16 {end_bf16:.4f}, "
          f"fp8 {end_fp8:.4f}; median step bf16 {r['bf16']['median_step_ms']:.1f} ms, "
          f"fp8 {r['fp8']['median_step_ms']:.1f} ms (eager)")
    assert all(x == x and abs(x) != float("inf") for x in bf16 + fp8), r
    assert end_bf16 < bf16[0] - 1.0 and end_fp8 < fp8[0] - 1.0, r  # both learn
    assert abs(end_fp8 - end_bf16) < TRAIN_LOSS_TOL, (end_fp8, end_bf16)
