"""Multi-node through torchrun's own rendezvous, on one host: two ``torchrun --nnodes 2`` "nodes" of one
process each meet at a c10d endpoint on 127.0.0.1 (gloo), as they would across hosts (README: Multi-node).

The two nodes must write one record per variant (global rank 0 writes) with the same training and
validation losses as one ``torchrun --standalone --nproc-per-node 2`` of the same variants: ranks,
local ranks and devices come only from the torchrun environment.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import uuid

import pytest

from test_runner import EQUIV, ROOT, TIMEOUT, _env, by_variant, explain, losses, records, torchrun

pytestmark = pytest.mark.slow

VARIANTS = ("--variant", "dp", "--variant", "tp2")  # dp and tp both talk across the two nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(scenario, out, *args: str) -> list[subprocess.CompletedProcess]:
    """Starts both nodes at once and waits for both."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
           "-m", "suite", "run", str(scenario), "--out", str(out), *args]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    done = []
    for p in nodes:
        try:
            stdout, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in nodes:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, ""))
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    nodes = two_nodes(EQUIV, tmp / "nodes", *VARIANTS)
    single = torchrun(2, EQUIV, tmp / "single", *VARIANTS)
    return {"nodes": nodes, "single": single, "nodes_out": tmp / "nodes", "single_out": tmp / "single"}


def test_two_nodes_write_one_record_per_variant(runs):
    for node in runs["nodes"]:
        assert node.returncode == 0, explain(node)
    recs = records(runs["nodes_out"])
    assert sorted(r["variant"] for r in recs) == ["dp", "tp2"]
    assert all(r["status"] == "ok" and r["world_size"] == 2 for r in recs)
    assert {r["variant"]: (r["tp"], r["dp"]) for r in recs} == {"dp": (1, 2), "tp2": (2, 1)}


def test_two_nodes_train_like_one_node_of_two(runs):
    assert runs["single"].returncode == 0, explain(runs["single"])
    nodes, single = by_variant(records(runs["nodes_out"])), by_variant(records(runs["single_out"]))
    for name in ("dp", "tp2"):
        assert losses(nodes[name]) == pytest.approx(losses(single[name]), rel=1e-6), name
        assert nodes[name]["config_hash"] == single[name]["config_hash"]
        assert nodes[name]["metrics"]["validation_loss"] == pytest.approx(
            single[name]["metrics"]["validation_loss"], rel=1e-6), name
