"""A training step never makes the host wait for the GPU (suite.workloads.train.Trainer.train_step).

A step that waits anywhere (a read-back, a copy from pageable memory, a blocking copy) drains the GPU's
queue, and the GPU then idles while the host launches what follows: time that the step clock counts. The
check: queue a spin kernel of about two seconds, then run one whole training step (data copy, forward and
backward of two micro-batches, gradient clipping, optimizer, LR schedule). A step that never waits returns
to the host while the spin still runs; any wait costs the rest of the spin. The tiny test model with one
layer, eager, bf16 (unfused, and ``fused`` with the clip inside torch's fused AdamW) and fp8 (where the
GPU has float8 tensor cores), clipping on.

Why one layer: a stream holds about a thousand pending kernel launches, and a host that gets that far ahead
waits at the next launch until the GPU frees a slot. That is backpressure, not a synchronisation, but from
here it looks the same; eager fp8 launches some 15 kernels per linear layer and GEMM, and four layers of it
fill the queue. One layer keeps the step's launches well under it.

Runs in ONE worker subprocess (``python THIS_FILE --worker OUT DIR``), a world of one over NCCL on GPU 0.
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
SPIN_S = 2.0
HOST_LIMIT_S = 1.0  # a waiting step takes at least the rest of the spin; an eager tiny step's host time is ~0.1 s


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return run_worker(__file__, tmp_path_factory.mktemp("train_step_worker"), 600)


# --- run in the worker subprocess -------------------------------------------------------------------

def _spin_cycles(seconds: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for ``seconds`` (measured on this GPU)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10**8
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles * seconds / (start.elapsed_time(end) / 1000.0))


def _where_the_host_waits(thread_id: int, after_s: float, found: list) -> None:
    """Samples the stepping thread's Python stack ``after_s`` into the spin: a step still running then is
    blocked in a call that waits for the GPU (PyTorch releases the GIL there), and the stacks name it."""
    import threading
    import traceback

    time.sleep(after_s)
    frames = sys._current_frames()
    if thread_id in frames:  # the stepping thread first, then others (autograd runs the backward on its own)
        others = [f for t, f in frames.items() if t not in (thread_id, threading.get_ident())]
        found.extend("".join(traceback.format_stack(f)[-8:]) for f in [frames[thread_id], *others])


def _step_behind_a_spin(precision: str, kernels: str = "torch") -> dict:
    import threading
    import warnings

    import torch

    from suite.launch.spmd import RankContext
    from suite.scenario import load_scenario
    from suite.workloads.train import Trainer

    overrides = [f"workload.precision={precision}", "workload.clip_grad=1.0", "model.num_layers=1",
                 f"model.kernels={kernels}"]
    (spec,) = load_scenario(SCENARIO, overrides, only=["fp8"])
    trainer = Trainer(spec, RankContext(0, 1, 0))
    for step in range(2):  # first calls: allocations, lazy initialisation
        trainer.train_step(step)
    torch.cuda.synchronize()
    waits: list[str] = []
    sampler = threading.Thread(target=_where_the_host_waits, args=(threading.get_ident(), SPIN_S / 2, waits))
    torch.cuda._sleep(_spin_cycles(SPIN_S))
    sampler.start()
    torch.cuda.set_sync_debug_mode("warn")  # names the synchronising calls PyTorch knows of
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            loss = trainer.train_step(2)
            host_s = time.perf_counter() - started
    finally:
        torch.cuda.set_sync_debug_mode("default")
    still_spinning = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    sampler.join()
    syncs = sorted({f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)})
    return {"host_s": host_s, "gpu_busy_after_step": still_spinning, "loss": float(loss),
            "micro_batches": spec.workload.global_batch // spec.workload.micro_batch,
            "waiting_in": "\n".join(waits) if waits and host_s > SPIN_S / 2 else None, "sync_warnings": syncs}


def check_bf16(folder):
    return _step_behind_a_spin("bf16")


def check_bf16_fused(folder):  # torch's fused AdamW, the clip inside its step (optimizer_kernels.clip_in_step)
    return _step_behind_a_spin("bf16", "fused")


def check_fp8(folder):
    import torch

    if torch.cuda.get_device_capability() < (8, 9):
        return None
    return _step_behind_a_spin("fp8")


CHECKS = [check_bf16, check_bf16_fused, check_fp8]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3], cuda=True))


# --- pytest: assertions on the worker's results -----------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "bf16_fused", "fp8"])
def test_training_step_returns_while_the_gpu_is_still_busy(worker, precision):
    r = result(worker, precision)
    if r is None:
        pytest.skip("float8 tensor cores need compute capability >= 8.9")
    print(f"\n{precision}: step returned to the host after {r['host_s'] * 1000:.1f} ms behind a {SPIN_S:.0f} s spin")
    assert r["micro_batches"] >= 2 and r["loss"] == r["loss"], r
    where = r["waiting_in"] or "(not sampled)"
    assert r["gpu_busy_after_step"] and r["host_s"] < HOST_LIMIT_S, \
        f"the step waited for the GPU ({r['host_s']:.2f} s); synchronising calls: {r['sync_warnings']}; " \
        f"the host was waiting in:\n{where}"
