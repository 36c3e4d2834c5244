"""The plug-in registry (suite.registry): unique names, conflicting plug-ins refused at validation, and an
out-of-tree technique and parallel mode (tests/plugins/, loaded through SUITE_PLUGINS) run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from check_worker import ROOT, subprocess_env

from suite import registry
from suite.errors import UserError
from suite.fields import doc
from suite.scenario import load_scenario

PLUGINS = ROOT / "tests" / "plugins"
TINY = """
[model]
num_layers = 4
hidden_size = 64
num_attention_heads = 4
ffn_hidden_size = 192
vocab_size = 256
max_sequence_length = 256
"""


@dataclass
class Empty:
    """[tricks.x]"""

    n: int = doc("A number.", 1, range="[1, 10]")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_a_second_plugin_of_a_taken_name_is_refused():
    registry.load()
    with pytest.raises(ValueError, match="'random_ltd' is registered twice"):
        registry.register(registry.Trick(name="random_ltd", config=Empty))
    with pytest.raises(ValueError, match="'cqil' is registered twice"):
        registry.register_mode(registry.ParallelMode(name="cqil", config=Empty))
    with pytest.raises(ValueError, match="analysis 'similarity' is registered twice"):
        registry.register_analysis(registry.Analysis("similarity", "", "", lambda p: None, "m:f"))
    registry.register(registry.TRICKS["random_ltd"])  # the same plug-in again (a re-import) is fine


def test_analyses_come_from_plug_ins():
    """`suite analyze` lists what plug-ins registered; the command line names none of them."""
    from suite.cli import build_parser

    cli = (Path(registry.__file__).parent / "cli.py").read_text()
    assert "similarity" not in cli and "cqil" not in cli.lower()
    args = build_parser().parse_args(["analyze", "similarity", "s.toml", "--threshold", "0.9"])
    assert args.threshold == 0.9 and registry.ANALYSES["similarity"].command.endswith(":similarity_command")


def test_two_workload_loops_are_refused_naming_both(tmp_path, monkeypatch):
    registry.load()
    monkeypatch.setitem(registry.TRICKS, "loop", registry.Trick(name="loop", config=Empty, workload="x.y"))
    path = write(tmp_path, TINY + "[workload]\neval_interval = 2\n[tricks.multilevel]\nsteps = [4, 4, 4]\n"
                                  "[tricks.loop]\n")
    with pytest.raises(UserError, match="techniques multilevel and loop both replace the workload loop") as e:
        load_scenario(path)
    assert e.value.key == "tricks"


def test_two_parallel_modes_are_refused_naming_both(tmp_path, monkeypatch):
    registry.load()
    monkeypatch.setitem(registry.PARALLEL_MODES, "other", registry.ParallelMode(name="other", config=Empty))
    path = write(tmp_path, TINY + '[workload]\nkind = "inference"\n[parallel]\n'
                                  "cqil = { start = 0, end = 4, degree = 2 }\nother = { n = 2 }\n")
    with pytest.raises(UserError, match="parallel modes cqil and other both lay out") as e:
        load_scenario(path)
    assert e.value.key == "parallel.other"


def test_a_parallel_mode_table_is_typed_and_written_where_the_user_wrote_it(tmp_path):
    path = write(tmp_path, TINY + '[workload]\nkind = "inference"\n[parallel]\n'
                                  "cqil = { start = 0, end = 4, degree = 2 }\n")
    (v,) = load_scenario(path)
    assert v.world_size() == 2
    resolved = v.resolved()["parallel"]["cqil"]
    assert resolved["start"] == 0 and resolved["degree"] == 2 and resolved["finetune"] is None
    with pytest.raises(UserError, match="unknown key 'cqli' in \\[parallel\\] \\(did you mean 'cqil'\\?\\)"):
        load_scenario(write(tmp_path, TINY + "[parallel]\ncqli = { degree = 2 }\n"))


SCENARIO = 'name = "plugins"\n' + TINY + """
[workload]
steps = 4
warmup_steps = 1
global_batch = 4
micro_batch = 1
seq_length = 32
log_interval = 2
batch_sizes = [1]
prompt_lengths = [8]
gen_lengths = [2]
repeats = 2
warmup_repeats = 0
[eval]
validation = false

[variants.counted.tricks.step_counter]
every = 2

[variants.mirrored.workload]
kind = "inference"
[variants.mirrored.parallel]
mirror = { degree = 2 }
"""


@pytest.mark.slow
def test_out_of_tree_technique_and_parallel_mode_run_end_to_end(tmp_path):
    path, out = write(tmp_path, SCENARIO), tmp_path / "out"
    env = subprocess_env()
    env["SUITE_PLUGINS"] = "step_counter,mirror"
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), env.get("PYTHONPATH", "")])
    plan = subprocess.run([sys.executable, "-m", "suite", "plan", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "tp1 pp1 mirror2" in plan.stdout  # the mode's plan row
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "suite",
           "run", str(path), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    recs = {rec["variant"]: rec for rec in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    counted, mirrored = recs["counted"], recs["mirrored"]
    assert counted["status"] == "ok" and mirrored["status"] == "ok", (counted.get("error"), mirrored.get("error"))
    # the technique's hooks ran: 4 steps of 2 micro-batches on this DP rank (global 4 / micro 1 / dp 2)
    assert counted["metrics"]["extra"]["step_counter"] == {"steps": 4, "microbatches": 8, "marked": [0, 2]}
    assert counted["config"]["tricks"]["step_counter"] == {"every": 2}
    # the parallel mode's world size, layout keys, metrics block and layer spec (each layer all-reduced)
    assert mirrored["world_size"] == 2 and mirrored["layout"]["mirror_degree"] == 2
    assert mirrored["layout"]["dp"] == 1
    assert mirrored["metrics"]["mirror"]["degree"] == 2
    # 4 layers x (prefill + 2 decode steps) x 2 requests on rank 0, at least
    assert mirrored["metrics"]["mirror"]["layer_all_reduces"] >= 4 * 3 * 2
    assert mirrored["config"]["parallel"]["mirror"] == {"degree": 2}
    assert mirrored["metrics"]["inference"][0]["repeats_same_tokens"] is True
