"""`python -m suite run FILE --slurm ...` (suite.launch.slurm): jobs sized from the plan, the torchrun each
node runs, the option's errors, and one real job end to end through submitit's debug executor (no Slurm
here: the debug executor runs the same pickled job function in this process)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from suite.errors import UserError
from suite.launch import handoff, slurm

pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parents[1]
EQUIV = ROOT / "tests" / "scenarios" / "runner" / "equivalence.toml"
LAUNCHER = ROOT / "tests" / "scenarios" / "runner" / "launcher.toml"


def test_options_parse():
    o = slurm.parse_options("partition=gpu,time=1:30:00,account=proj,gpus_per_node=4")
    assert (o.partition, o.time_min, o.account, o.gpus_per_node, o.cluster) == ("gpu", 90, "proj", 4, "slurm")
    assert slurm.parse_options("partition=p,time=2-00:00:00").time_min == 2880
    assert slurm.parse_options("partition=p,time=45").time_min == 45


@pytest.mark.parametrize("text, words", [
    ("time=10", "no partition"), ("partition=p,acount=x", "did you mean 'account'"),
    ("partition=p,time=soon", "not a number"), ("partition=p,cluster=k8s", "cluster 'k8s'"),
    ("partition", "not KEY=VALUE"), ("partition=p,gpus_per_node=0", "at least 1")])
def test_bad_options_are_user_errors(text, words):
    with pytest.raises(UserError, match=words):
        slurm.parse_options(text)


class FakeExecutor:
    """Records what would be submitted (the parameters of each job and its node command)."""

    def __init__(self):
        self.params, self.jobs = {}, []

    def update_parameters(self, **kw):
        self.params = kw

    def submit(self, fn, *args):
        self.jobs.append((dict(self.params), fn, args))
        return type("Job", (), {"job_id": str(len(self.jobs))})()


def test_each_variant_gets_a_job_sized_from_its_plan(tmp_path, monkeypatch, capsys):
    from suite.cli import main

    fake = FakeExecutor()
    monkeypatch.setattr(slurm, "make_executor", lambda opts, folder: fake)
    rc = main(["run", str(EQUIV), "--out", str(tmp_path), "--nproc", "4", "--set", "workload.global_batch=24",
               "--variant", "dp", "--variant", "tp2", "--variant", "dp3",
               "--slurm", "partition=gpu,time=30,account=proj,gpus_per_node=3"])
    assert rc == 0
    shape = {p["name"]: (p["nodes"], p["gpus_per_node"], p["tasks_per_node"]) for p, _, _ in fake.jobs}
    # dp and tp2 take the world from --nproc 4: 2 nodes x 2 (at most 3 a node); dp3 sets dp = 3: 1 node x 3
    assert shape == {"suite-runner_equivalence-dp": (2, 2, 1), "suite-runner_equivalence-tp2": (2, 2, 1),
                     "suite-runner_equivalence-dp3": (1, 3, 1)}
    params, fn, (inner, nodes, per_node, env) = fake.jobs[0]
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "proj" and params["timeout_min"] == 30
    assert fn is slurm.run_node and inner[:4] == ["-m", "suite", "run", str(EQUIV)]
    # the job's ranks read the variant resolved at submission (--set applied), not the TOML
    (v,) = handoff.read(env[handoff.ENV])
    assert v.name == "dp" and v.workload.global_batch == 24
    assert "job 1 (2 nodes x 2 GPUs, partition gpu)" in capsys.readouterr().out


def test_node_command_uses_torchrun_rendezvous():
    one = slurm.node_command(["-m", "suite"], 1, 8, "77", ["n1"])
    assert "--standalone" in one and "--nproc-per-node=8" in one
    two = slurm.node_command(["-m", "suite"], 2, 8, "77", ["n1", "n2"])
    endpoint = next(a for a in two if a.startswith("--rdzv-endpoint="))
    assert "--nnodes=2" in two and "--rdzv-backend=c10d" in two and "--rdzv-id=77" in two
    assert endpoint.startswith("--rdzv-endpoint=n1:") and two == slurm.node_command(["-m", "suite"], 2, 8, "77",
                                                                                     ["n1", "n2"])


def test_uneven_split_is_refused(tmp_path, capsys):
    from suite.cli import main

    rc = main(["run", str(EQUIV), "--variant", "dp3", "--out", str(tmp_path), "--slurm", "partition=p,gpus_per_node=2"])
    # 3 GPUs over nodes of at most 2: 2 nodes, which 3 does not divide
    err = capsys.readouterr().err
    assert rc == 2 and "variant 'dp3'" in err and "split evenly" in err and "Traceback" not in err


@pytest.mark.slow
def test_debug_executor_runs_the_job_end_to_end(tmp_path):
    """The real job function through submitit: torchrun inside the job, one ok record, the handoff cleaned."""
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "suite", "run", str(LAUNCHER), "--variant", "single",
                           "--out", str(out), "--slurm", "partition=cpu,cluster=debug"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["status"], r["world_size"]) for r in recs] == [("single", "ok", 1)]
    assert "--standalone" in proc.stdout and not (out / "resolved").exists()
