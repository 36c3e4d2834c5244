"""How long a training step's GPU waits for the host: a device-only delay at the start of every step.

``torch.cuda._sleep`` spins the GPU for SUITE_PROBE_SLEEP_MS before the step's first kernel while the host
goes on launching. Where the step is bound by its kernels, the step grows by the whole delay; where the GPU
idles waiting for launches, the host uses the delay to get ahead and the step grows by less: the delay minus
the step's growth is GPU time the host was holding back. Run a variant at 0 and at two delays:

    PYTHONPATH=bench/host_slack:$PYTHONPATH SUITE_PROBE_SLEEP_MS=20 python -m suite run SCENARIO --variant V

Active only in the runner's ranks (LOCAL_RANK set) and when SUITE_PROBE_SLEEP_MS is set; the delay is
calibrated once (cycles per millisecond at the first step) and printed. A measuring aid, not part of suite.
"""
import os

if os.environ.get("SUITE_PROBE_SLEEP_MS") and os.environ.get("LOCAL_RANK") is not None:
    import torch

    import suite.workloads.train as _train

    _step = _train.Trainer.train_step
    _cycles_per_ms = []

    def _delayed_step(self, step):
        ms = float(os.environ["SUITE_PROBE_SLEEP_MS"])
        if not _cycles_per_ms:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            torch.cuda._sleep(20_000_000)
            b.record()
            torch.cuda.synchronize()
            _cycles_per_ms.append(20_000_000 / a.elapsed_time(b))
            print(f"probe: {_cycles_per_ms[0]:.0f} cycles/ms, sleeping {ms} ms a step", flush=True)
        if ms > 0:
            torch.cuda._sleep(int(ms * _cycles_per_ms[0]))
        return _step(self, step)

    _train.Trainer.train_step = _delayed_step
