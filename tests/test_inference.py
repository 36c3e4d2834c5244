"""The inference workload: KV-cache decode equals a full-sequence forward at every layout; its record.

Fast tests check the grid, the byte and FLOP counts and the validation. Slow tests run real
processes (this file is also the worker: ``python tests/test_inference.py OUT VARIANT...``, under
torchrun for more than one process) on ``scenarios/cqil_tiny.toml``:

* one process, ``single``: prefill of 16 tokens, then 8 decode steps fed the *given* next tokens
  (teacher forcing) give the logits of GPTModel.forward over all 24 tokens at positions 15..23;
* two processes, ``tp2`` and ``pp2``: the same decode logits as the one-process full forward (the
  weights are drawn per global parameter, so every layout computes the same function);
* ``torchrun -m suite run`` of two variants: records with one latency entry per grid point.

Tolerance: fp32 logits (magnitude ~1) agree to 1e-5 absolute; observed differences are ~1e-7
(SDPA with a mask over the cache vs. the causal kernel, TP reduction order).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from check_worker import ROOT, run_suite, subprocess_env
SCENARIO = ROOT / "scenarios" / "cqil_tiny.toml"
BATCH, SEQ, PROMPT = 2, 24, 16
ATOL = 1e-5
TIMEOUT = 300


# --- worker (runs in subprocesses; imports torch and megatron there) --------------------------------

def fixed_tokens(vocab: int):
    import torch

    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def teacher_forced_logits(engine, tokens, prompt: int):
    """Logits of the prefill of tokens[:, :prompt], then of one decode step per further token fed
    the given token: the predictions for positions prompt-1 .. s-1, [b, s-prompt+1, vocab]."""
    import torch

    b, s = tokens.shape
    engine.allocate(b, s)
    engine.prefill(tokens[:, :prompt])
    out = [engine.logits.clone()]
    for t in range(prompt, s):
        engine.tokens.copy_(tokens[:, t:t + 1])
        engine.decode()
        out.append(engine.logits.clone())
    engine.release()
    return torch.stack(out, dim=1)


def full_logits(engine, tokens):
    """GPTModel.forward over the whole sequence, cache off, gathered over TP: [b, s, vocab]."""
    import torch
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    engine.state.mode = "off"
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = engine.model(tokens, positions, None)
    return gather_from_tensor_model_parallel_region(logits)[..., :engine.spec.model.vocab_size]


def init_worker():
    """gloo process group (torchrun's, or a 1-process one) with megatron on the CPU."""
    import tempfile

    import torch
    import torch.distributed as dist

    from suite.launch import cpu_compat

    torch.set_num_threads(1)
    cpu_compat.enable()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        store = tempfile.NamedTemporaryFile(prefix="inference_pg_", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def worker(out: str, scenario: str, variants: list[str]) -> None:
    """Per variant, this rank's decode logits (last pipeline stage) and full-forward logits (pp = 1)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from suite.scenario import load_scenario
    from suite.models.generate import Engine

    init_worker()
    results = {}
    for name in variants:
        (spec,) = load_scenario(scenario, [], [name])
        ps.initialize_model_parallel(tensor_model_parallel_size=spec.parallel.tp,
                                     pipeline_model_parallel_size=spec.parallel.pp)
        engine = Engine(spec)
        tokens = fixed_tokens(spec.model.vocab_size)
        decode = teacher_forced_logits(engine, tokens, PROMPT)
        results[name] = {"decode": decode if engine.last else None,
                         "full": full_logits(engine, tokens) if engine.pp == 1 else None}
        engine.close()
        ps.destroy_model_parallel()
    torch.save(results, Path(out) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


# --- helpers for the tests ------------------------------------------------------------------------

def run_worker(script: Path, out: Path, nproc: int, scenario: Path, *variants: str) -> list[dict]:
    """Runs ``script``'s worker on ``nproc`` processes; returns every rank's results."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(nproc)]
    r = subprocess.run([*launch, str(script), str(out), str(scenario), *variants], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return [torch.load(out / f"rank{i}.pt") for i in range(nproc)]


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


# --- fast: grid, counts, validation ---------------------------------------------------------------

def load(tmp_path, text: str, name: str = "default"):
    from suite.scenario import load_scenario

    path = tmp_path / "s.toml"
    path.write_text(text)
    return {v.name: v for v in load_scenario(path)}[name]


TINY = '[model]\npreset = "tiny"\n[workload]\nkind = "inference"\n'


def test_grid_is_the_product_with_graphs_only_on_gpus(tmp_path):
    from suite.workloads.inference import grid

    w = load(tmp_path, TINY + "batch_sizes = [1, 4]\nprompt_lengths = [8]\ngen_lengths = [0, 2]\n"
             'cuda_graph = "both"\n').workload
    assert grid(w, cuda=True) == [(1, 8, 0, False), (1, 8, 2, False), (1, 8, 2, True),
                                  (4, 8, 0, False), (4, 8, 2, False), (4, 8, 2, True)]
    assert grid(w, cuda=False) == [(1, 8, 0, False), (1, 8, 2, False), (4, 8, 0, False), (4, 8, 2, False)]


def test_prompts_come_from_the_held_out_text_when_the_variant_has_a_corpus(tmp_path):
    """With a text corpus the prompts are windows of its held-out tail (what validation reads, never
    trained on), spread over it and the same on every call; without one, seeded random tokens."""
    import random

    import torch

    from suite.data.tokens import TokenSource
    from suite.workloads.inference import prompt_source, prompt_tokens

    corpus = tmp_path / "c.txt"
    rng = random.Random(0)  # text without repeats, so each window is found at one place
    corpus.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz .,\n") for _ in range(20000)))
    spec = load(tmp_path, TINY + f'[data]\nsource = "text"\npath = "{corpus}"\n')
    prompts = prompt_tokens(spec, 3, 16)
    tail = TokenSource(spec).valid
    assert prompt_source(spec) == "text" and prompts.shape == (3, 16) and prompts.dtype == torch.long
    starts = []
    for row in prompts:  # each row is a contiguous piece of the tail
        at = next(i for i in range(len(tail) - 15) if torch.equal(tail[i:i + 16], row))
        starts.append(at)
    assert starts[0] == 0 and starts == sorted(set(starts))  # spread over the tail, distinct
    assert torch.equal(prompts, prompt_tokens(spec, 3, 16))
    synthetic = load(tmp_path, TINY)
    assert prompt_source(synthetic) == "synthetic"
    assert torch.equal(prompt_tokens(synthetic, 2, 8), prompt_tokens(synthetic, 2, 8))
    from suite.errors import UserError
    with pytest.raises(UserError, match="workload.prompt_lengths"):
        prompt_tokens(spec, 1, len(tail) + 1)
    with pytest.raises(UserError) as e:  # validation already refuses a prompt the tail cannot hold
        load(tmp_path, TINY + f"prompt_lengths = [{len(tail) + 100}]\n"
             + f'[data]\nsource = "text"\npath = "{corpus}"\n')
    assert e.value.key == "workload.prompt_lengths" and "validation tail" in str(e.value)


def test_distinct_ngrams_by_hand():
    from suite.workloads.inference import distinct_ngrams

    assert distinct_ngrams([[1, 2, 3, 4, 1, 2, 3, 4]]) == 4 / 5  # 1234 2341 3412 4123 1234
    assert distinct_ngrams([[7] * 10]) == 1 / 7  # a loop of one token
    assert distinct_ngrams([[1, 2, 3, 4, 5], [7] * 5]) == (1 + 1 / 2) / 2  # averaged over sequences
    assert distinct_ngrams([[1, 2, 3]]) is None


def test_decode_bytes_and_prefill_flops_by_hand(tmp_path):
    from suite.metrics import flops as F
    from suite.workloads.inference import decode_bytes_per_step, prefill_flops

    shape = F.Shape.of(load(tmp_path, TINY).model)  # 4 layers, h 64, 4 heads, 2 groups, ffn 192, vocab 256
    layer = 64 * (64 + 2 * 2 * 16) + 64 * 64 + 3 * 64 * 192 + 2 * 64  # q+k+v, out, SwiGLU, two norms
    weights = 4 * layer + 64 + 256 * 64 + 2 * 64  # layers, final norm, LM head, 2 embedding rows
    kv = 4 * 2 * 2 * 16 * 2  # layers x (K, V) x groups x head dim x bf16 bytes, per token
    assert decode_bytes_per_step(shape, 2, 10, 4, 2) == weights * 2 + 2 * (10 + 2.5) * kv
    # prefill: the layers over the whole prompt, the LM head on its last position only
    assert prefill_flops(shape, 2, 10) == F.forward_flops(shape, 2, 10) - F.head_forward_flops(shape, 2, 9)


@pytest.mark.parametrize("extra, key, fragment", [
    ("prompt_lengths = [200]\ngen_lengths = [64]\n", "workload.prompt_lengths",
     "prompt 200 + generated 64 tokens exceed the model's max_sequence_length 256"),
    ("batch_sizes = []\n", "workload.batch_sizes", "batch_sizes must be a non-empty list of integers >= 1"),
    ("gen_lengths = [-1]\n", "workload.gen_lengths", "-1 is outside [0, "),
    ("repeats = 0\n", "workload.repeats", "repeats = 0 is outside [1, "),
    ('cuda_graph = "yes"\n', "workload.cuda_graph", "'yes' is not one of off, on, both"),
    ("[parallel]\ndp = 2\n", "parallel.dp", "inference measures one model replica"),
    ("[parallel]\ntp = 2\nsequence_parallel = true\n", "parallel.sequence_parallel", "without sequence parallelism"),
    ("[tricks.random_ltd]\nmin_kept = 16\n", "tricks", "techniques random_ltd change training"),
])
def test_inference_settings_are_validated(tmp_path, extra, key, fragment):
    from suite.errors import UserError

    with pytest.raises(UserError) as e:
        load(tmp_path, TINY + extra)
    assert e.value.key == key and fragment in str(e.value) and e.value.fix


def test_inference_runs_exactly_its_layout(tmp_path):
    from suite.errors import UserError
    from suite.scenario.validate import check_world

    v = load(tmp_path, TINY + "[parallel]\ntp = 2\n")
    assert v.world_size() == 2 and v.world_size(launched=8) == 2  # never replicated over dp
    check_world(v, 2)
    with pytest.raises(UserError, match=r"tp x pp = 2 process\(es\), but 4 were launched"):
        check_world(v, 4)


# --- slow: real processes -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("inference_layouts")
    (single,) = run_worker(Path(__file__), base / "one", 1, SCENARIO, "single")
    two = run_worker(Path(__file__), base / "two", 2, SCENARIO, "tp2", "pp2")
    return {"single": single["single"], "tp2": two[0]["tp2"], "pp2": two[1]["pp2"]}


@pytest.mark.slow
def test_decode_with_kv_cache_equals_the_full_forward(layouts):
    full, decode = layouts["single"]["full"], layouts["single"]["decode"]
    assert decode.shape == (BATCH, SEQ - PROMPT + 1, 256)
    assert max_diff(decode, full[:, PROMPT - 1:]) < ATOL
    # the cache matters: without it the logits would not depend on the earlier tokens
    assert max_diff(full[:, PROMPT - 1:], full[:, :SEQ - PROMPT + 1]) > 100 * ATOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_decode_at_other_layouts_equals_the_single_process_forward(layouts, layout):
    full = layouts["single"]["full"]
    assert max_diff(layouts[layout]["decode"], full[:, PROMPT - 1:]) < ATOL
    if layouts[layout]["full"] is not None:
        assert max_diff(layouts[layout]["full"], full) < ATOL


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference_records")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "suite",
           "run", str(SCENARIO), "--variant", "pp2", "--variant", "cqil2_bypass", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return out, {rec["variant"]: rec for rec in recs}


@pytest.mark.slow
def test_record_holds_the_latency_grid(records):
    _, recs = records
    assert sorted(recs) == ["cqil2_bypass", "pp2"]
    for name, rec in recs.items():
        assert rec["status"] == "ok", rec.get("error")
        m = rec["metrics"]
        assert m["world_size"] == 2 and m["cuda_graph_unavailable"] is True  # CPU: eager entries only
        grid = [(e["batch"], e["prompt"], e["gen"], e["cuda_graph"]) for e in m["inference"]]
        assert grid == [(1, 16, 4, False), (2, 16, 4, False)]
        for e in m["inference"]:
            assert e["repeats"] == 3 and e["decode_steps"] == 4 * 3
            assert 0 < e["prefill_ms_p10"] <= e["prefill_ms_median"] <= e["prefill_ms_p90"] <= e["prefill_ms_p99"]
            assert 0 < e["decode_ms_p10"] <= e["decode_ms_median"] <= e["decode_ms_p90"] <= e["decode_ms_p99"]
            assert e["prefill_tokens_per_s"] == pytest.approx(e["batch"] * 16 / (e["prefill_ms_median"] / 1e3))
            assert e["decode_tokens_per_s"] == pytest.approx(e["batch"] / (e["decode_ms_median"] / 1e3))
            assert e["request_ms_median"] >= e["prefill_ms_median"]
            assert e["prefill_mfu"] is None and e["decode_bandwidth_fraction"] is None  # no GPU ceilings
            assert e["repeats_same_tokens"] is True  # fp32 on CPU: every request decodes the same tokens
            assert all(isinstance(v, (int, float, bool, type(None))) for v in e.values())  # flat
    assert recs["pp2"]["metrics"]["cqil"] is None
    assert recs["cqil2_bypass"]["metrics"]["cqil"] == {"degree": 2, "groups": [[2, 3], [4, 5]], "bypass": 1,
                                                       "depth": 6, "layers_per_gpu": 6}


@pytest.mark.slow
def test_report_reads_inference_records(records):
    out, _ = records
    r = run_suite("report", out, timeout_s=60)
    assert r.returncode == 0, r.stderr
    assert "cqil2_bypass" in r.stdout


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3:])


def test_first_difference_names_the_first_generated_position_that_differs():
    from suite.workloads.inference import first_difference

    assert first_difference([[5, 6, 7], [1, 2, 3]], [[5, 6, 7], [1, 2, 3]]) is None
    assert first_difference([[5, 6, 7], [1, 2, 3]], [[5, 6, 7], [1, 9, 3]]) == 1  # any sequence of the batch
    assert first_difference([[4, 6, 7]], [[5, 6, 7]]) == 0  # the prefill's token: later logits compare other inputs
