"""Speculative decoding (suite.tricks.speculative): the output is the target's greedy output, token for
token; its FLOPs; its validation; a run and its report.

The model checks run in one single-process worker (``python tests/test_speculative.py --worker OUT DIR``)
on the tiny preset in fp32 (4 layers, vocabulary 256, random weights):

* for k in {1, 2, 4}, two prompt shapes (batch 1 × 5 tokens, batch 3 × 11 tokens) and five drafts — the
  first layer and the first three (self-speculative), a smaller second model, a second model identical
  to the target (every proposal accepted: the path where the draft must catch up on dk) and a draft
  that always proposes a wrong token (nothing accepted) — the generated tokens equal the target's
  plain greedy decoding (``Engine.prefill`` then one ``decode`` per token);
* over CQIL's layout on 2 processes (``python -m torch.distributed.run ... tests/test_speculative.py --cqil
  OUT``): the tokens of CQIL's own greedy decoding, identical on both ranks;
* FlopCounterMode over a whole speculative request equals ``request_flops`` without the attention
  products (on CPU the counter sees only ``aten.mm``: it has no formula for CPU SDPA, see
  tests/test_flops.py), exactly: every projection and LM-head position of every forward is counted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from check_worker import ROOT, result, run_suite, run_worker, torchrun, worker_main

from suite.errors import UserError
from suite.metrics import flops as F
from suite.tricks.speculative import forward_flops, greedy_flops, request_flops

TINY = """
[model]
preset = "tiny"
[workload]
kind = "inference"
precision = "fp32"
batch_sizes = [1]
prompt_lengths = [11]
gen_lengths = [24]
repeats = 1
warmup_repeats = 0
"""
DRAFTS = {"self1": '"layers:1"', "self3": '"layers:3"',
          "small": '{ preset = "tiny", num_layers = 2, hidden_size = 32 }',
          "identical": '{ preset = "tiny" }', "wrong": '"layers:2"'}
GEN = 24
SHAPES = [(1, 5), (3, 11)]  # (batch, prompt)


def scenario(folder: Path, draft: str, k: int = 4, extra: str = "") -> Path:
    path = Path(folder) / "s.toml"
    path.write_text(TINY + extra + f"[tricks.speculative]\ndraft = {draft}\nk = {k}\n")
    return path


def load(tmp_path, draft: str, k: int = 4, extra: str = ""):
    from suite.scenario import load_scenario

    (spec,) = load_scenario(scenario(tmp_path, draft, k, extra))
    return spec


# --- the worker -----------------------------------------------------------------------------------

def _greedy(engine, prompt, gen: int):
    import torch

    engine.allocate(*prompt.shape[:1], prompt.shape[1] + gen)
    engine.prefill(prompt)
    out = [engine.tokens.clone()]
    for _ in range(gen):
        engine.decode()
        out.append(engine.tokens.clone())
    engine.release()
    return torch.cat(out, dim=1)


def check_output_is_the_targets_greedy_output(tmp):
    import torch

    from suite.tricks.speculative.engine import Speculative
    from suite.workloads.inference import prompt_tokens

    class Wrong(Speculative):
        """Proposes, at every position, a token the target does not choose there (from its greedy output)."""

        reference = None

        def propose(self):
            super().propose()  # keep the draft's own forwards (and cache) as they are
            start = self.pos - self.prompt_len + 1  # index in the reference of the first proposed position
            return (self.reference[:, start:start + self.k] + 1) % self.spec.model.vocab_size  # k spare at the end

    out = {}
    for name, draft in DRAFTS.items():
        spec = load(Path(tmp), draft)
        for k in (1, 2, 4):
            engine = (Wrong if name == "wrong" else Speculative)(spec, spec.tricks["speculative"], log=lambda *_: None)
            engine.k = k
            for batch, prompt in SHAPES:
                tokens = prompt_tokens(spec, batch, prompt)
                reference = _greedy(engine.target, tokens, GEN + k)
                engine.reference, engine.prompt_len = reference, prompt
                got = engine.generate(tokens, GEN)
                stats = engine.stats
                # the same request on static buffers (what a CUDA graph captures), computed eagerly here
                engine.allocate(batch, engine.capacity(prompt, GEN))
                engine.use_static_forwards(tokens, graph=False)
                static = engine.request(tokens, GEN)
                engine.release()
                out[f"{name} k{k} b{batch} p{prompt}"] = {
                    "equal": torch.equal(got, reference[:, :GEN + 1]), "shape": list(got.shape),
                    "static_equal": torch.equal(static, reference[:, :GEN + 1]),
                    "static_steps": engine.stats.steps,
                    "acceptance": stats.acceptance_rate(), "tokens_per_step": stats.tokens_per_step(),
                    "steps": stats.steps}
            engine.close()
    return out


def check_flops_against_the_counter(tmp):
    from torch.utils.flop_counter import FlopCounterMode

    from suite.tricks.speculative.engine import Speculative, shapes
    from suite.workloads.inference import prompt_tokens

    out = {}
    for name in ("self1", "small"):
        spec = load(Path(tmp), DRAFTS[name], k=3)
        cfg = spec.tricks["speculative"]
        engine = Speculative(spec, cfg, log=lambda *_: None)
        tokens = prompt_tokens(spec, 2, 7)
        with FlopCounterMode(display=False) as counter:
            engine.generate(tokens, 9)
        target, draft = shapes(spec, cfg)
        out[name] = {"counted": counter.get_total_flops(), "forwards": [list(f) for f in engine.stats.forwards],
                     "analytic": request_flops(engine.stats.forwards, target, draft, attention=False)["total"]}
        engine.close()
    return out


CHECKS = [check_output_is_the_targets_greedy_output, check_flops_against_the_counter]

CQIL = (TINY.replace('preset = "tiny"', 'preset = "tiny"\nnum_layers = 6')
        + "[parallel]\ncqil = { start = 1, end = 5, degree = 2 }\n")


def cqil_worker(out: str) -> None:
    """Under torchrun, 2 processes: CQIL's greedy tokens (the plain engine over the CQIL layout) and the
    speculative ones over the same layout, per draft, on every rank."""
    import os
    import tempfile

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from suite.launch import cpu_compat
    from suite.tricks.speculative.engine import Speculative
    from suite.workloads.inference import prompt_tokens

    torch.set_num_threads(1)
    cpu_compat.enable()
    dist.init_process_group("gloo")
    ps.initialize_model_parallel()
    results = {}
    folder = Path(tempfile.mkdtemp(prefix=f"spec_cqil{os.environ['RANK']}_"))
    for name in ("self3", "small"):
        path = folder / "s.toml"
        path.write_text(CQIL + f"[tricks.speculative]\ndraft = {DRAFTS[name]}\nk = 3\n")
        from suite.scenario import load_scenario

        (spec,) = load_scenario(path)
        engine = Speculative(spec, spec.tricks["speculative"], log=lambda *_: None)
        tokens = prompt_tokens(spec, 2, 7)
        reference = _greedy(engine.target, tokens, 12)
        got = engine.generate(tokens, 12)
        results[name] = {"equal": torch.equal(got, reference), "tokens": got.tolist(),
                         "layers": len(engine.target.model.decoder.layers),
                         "acceptance": engine.stats.acceptance_rate()}
        engine.close()
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3]))
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--cqil":
    cqil_worker(sys.argv[2])


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("speculative_worker"), 300)


def test_every_draft_and_k_gives_the_targets_greedy_tokens(worker):
    data = result(worker, "output_is_the_targets_greedy_output")
    assert len(data) == len(DRAFTS) * 3 * len(SHAPES)
    for case, r in data.items():
        assert r["equal"], case
        assert r["shape"][1] == GEN + 1, case
        # static buffers (the CUDA-graph path, run eagerly): the same tokens; a second model's draft catches
        # up one token at a time there, which may round differently, so only the step count may differ
        assert r["static_equal"], case
        if "identical" in case or "wrong" in case or "self" in case:
            assert r["static_steps"] == r["steps"], case


def test_identical_draft_accepts_everything_and_a_wrong_draft_nothing(worker):
    data = result(worker, "output_is_the_targets_greedy_output")
    for k in (1, 2, 4):
        for batch, prompt in SHAPES:
            same, wrong = data[f"identical k{k} b{batch} p{prompt}"], data[f"wrong k{k} b{batch} p{prompt}"]
            assert same["acceptance"] == 1.0 and same["tokens_per_step"] == k + 1
            assert same["steps"] == -(-GEN // (k + 1))  # ceil: each step emits k + 1 tokens
            assert wrong["acceptance"] == 0.0 and wrong["tokens_per_step"] == 1.0 and wrong["steps"] == GEN
    # a real (random) self-speculative draft lies in between somewhere
    assert any(0 < r["acceptance"] < 1 for c, r in data.items() if c.startswith("self"))


def test_flops_equal_the_counter_exactly(worker):
    data = result(worker, "flops_against_the_counter")
    for name, r in data.items():
        assert r["counted"] == r["analytic"], name
        roles = {f[0] for f in r["forwards"]}
        assert roles == ({"prefill", "verify", "draft"} | ({"draft_prefill"} if name == "small" else set())), name


def test_with_cqil_the_output_is_cqils_greedy_output(tmp_path):
    """Speculative decoding over CQIL's layout (2 processes): the tokens of CQIL's own greedy decoding, the same
    on both ranks, for a self-speculative draft that reaches into the first group and a second model."""
    r = torchrun(__file__, "--cqil", str(tmp_path), nproc=2, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for name in ("self3", "small"):
        assert ranks[0][name]["equal"] and ranks[1][name]["equal"], name
        assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"], name
        assert ranks[0][name]["layers"] == 4  # layer 0, one of each group of 2 in 1..4, layer 5


# --- fast: FLOPs by hand, validation ---------------------------------------------------------------

def test_forward_flops_by_hand():
    s = F.Shape(layers=4, hidden=64, heads=4, groups=2, ffn=192, vocab=256)  # kv_dim 64
    b, new, start = 2, 3, 10
    linear = 2 * b * new * 64 * (64 + 64) + 2 * b * new * 64 * 64 + 6 * b * new * 64 * 192
    attention = 4 * b * new * (start + new) * 64
    head = 2 * b * 1 * 64 * 256
    assert forward_flops(s, 2, b, new, start, 1) == 2 * (linear + attention) + head
    assert forward_flops(s, 2, b, new, start, 1, attention=False) == 2 * linear + head


def test_request_flops_sums_each_role_with_its_model():
    target = F.Shape(layers=4, hidden=64, heads=4, groups=2, ffn=192, vocab=256)
    draft = F.Shape(layers=2, hidden=32, heads=4, groups=2, ffn=96, vocab=256)
    log = [("prefill", 1, 5, 0, 1), ("draft_prefill", 1, 5, 0, 1), ("draft", 1, 1, 5, 1), ("draft", 1, 1, 6, 1),
           ("verify", 1, 3, 5, 3)]
    got = request_flops(log, target, (draft, 2))
    assert got["prefill"] == forward_flops(target, 4, 1, 5, 0, 1)
    assert got["draft_prefill"] == forward_flops(draft, 2, 1, 5, 0, 1)
    assert got["draft"] == forward_flops(draft, 2, 1, 1, 5, 1) + forward_flops(draft, 2, 1, 1, 6, 1)
    assert got["verify"] == forward_flops(target, 4, 1, 3, 5, 3)
    assert got["total"] == sum(v for k, v in got.items() if k != "total")
    # plain greedy: the prefill is the same forward as the speculative one; gen one-token steps after it
    assert greedy_flops(target, 1, 5, 2) == (got["prefill"] + forward_flops(target, 4, 1, 1, 5, 1)
                                             + forward_flops(target, 4, 1, 1, 6, 1))


def test_a_valid_section_resolves(tmp_path):
    spec = load(tmp_path, '{ preset = "tiny", num_layers = 2 }', k=3)
    cfg = spec.tricks["speculative"]
    assert cfg.k == 3 and cfg.draft.num_layers == 2
    assert spec.resolved()["tricks"]["speculative"]["draft"]["preset"] == "tiny"
    assert load(tmp_path, '"layers:3"').tricks["speculative"].draft == "layers:3"


@pytest.mark.parametrize("draft,k,edit,key,fragment", [
    ('"layers:4"', 4, None, "tricks.speculative.draft", "shorter than the model's 4 layers"),
    ('"layers:0"', 4, None, "tricks.speculative.draft", "at least 1"),
    ('"first:2"', 4, None, "tricks.speculative.draft", "neither 'layers:N' nor a model table"),
    ('{ preset = "tiny", vocab_size = 300 }', 4, None, "tricks.speculative.draft.vocab_size", "vocabulary (300)"),
    ('{ preset = "tinyy" }', 4, None, "tricks.speculative.draft.preset", "unknown preset"),
    ('{ preset = "tiny", layers = 2 }', 4, None, "tricks.speculative.draft.layers", "unknown key 'layers'"),
    ('"layers:1"', 0, None, "tricks.speculative.k", "k = 0"),
    ('"layers:1"', 64, ("[24]", "[200]"), "model.max_sequence_length", "exceed max_sequence_length 256"),
    ('{ preset = "tiny", max_sequence_length = 32 }', 4, None, "tricks.speculative.draft.max_sequence_length",
     "exceed max_sequence_length 32"),
    ('"layers:1"', 4, ("[tricks", "[parallel]\ntp = 2\n[tricks"), "parallel.tp", "without tensor or pipeline"),
])
def test_settings_are_validated(tmp_path, draft, k, edit, key, fragment):
    from suite.scenario import load_scenario

    path = scenario(tmp_path, draft, k)
    if edit:
        path.write_text(path.read_text().replace(*edit))
    with pytest.raises(UserError) as e:
        load_scenario(path)
    assert e.value.key == key and fragment in str(e.value), str(e.value)


def test_training_variants_refuse_it(tmp_path):
    path = scenario(tmp_path, '"layers:1"')
    path.write_text(path.read_text().replace('kind = "inference"', 'kind = "train"'))
    from suite.scenario import load_scenario

    with pytest.raises(UserError, match="an inference technique") as e:
        load_scenario(path)
    assert e.value.key == "workload.kind"


# --- a run and its report --------------------------------------------------------------------------

def test_run_records_and_report(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(TINY.replace("gen_lengths = [24]", "gen_lengths = [6]") + "[report]\nbaseline = \"baseline\"\n"
                    "[variants.baseline]\n[variants.self.tricks.speculative]\ndraft = \"layers:2\"\nk = 2\n"
                    "[variants.self.workload]\ncuda_graph = \"both\"\n")  # on CPU: its eager rows only
    r = run_suite("run", path, "--out", tmp_path / "res", timeout_s=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = {json.loads(line)["variant"]: json.loads(line) for line in (tmp_path / "res" / "records.jsonl").open()}
    rec = recs["self"]
    assert rec["status"] == "ok"
    (block,) = rec["metrics"]["speculative"]
    assert rec["metrics"]["cuda_graph_unavailable"] is True and block["cuda_graph"] is False
    assert 0 < block["distinct_4grams"] <= 1 and rec["metrics"]["prompt_source"] == "synthetic"
    assert block["draft"] == "layers:2" and block["k"] == 2 and 0 <= block["acceptance_rate"] <= 1
    assert block["tokens_per_verify"] == pytest.approx(1 + 2 * block["acceptance_rate"])
    assert block["flops_total"] == block["flops_draft"] + block["flops_verify"] + block["flops_prefill"]
    names = {m["name"] for m in rec["measures"]}
    assert {"ttft", "ms_per_token", "verify_step", "acceptance_rate", "tokens_per_verify"} <= names
    per_token = next(m for m in rec["measures"] if m["name"] == "ms_per_token")
    assert len(per_token["samples"]) == 1 and per_token["point"] == {"batch": 1, "prompt": 11, "gen": 6, "graph": "off"}
    r = run_suite("report", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    assert "### Speculative decoding" in r.stdout and "| self | 1 | layers:2 | 2 | 1 | 11 | 6 | eager |" in r.stdout


def test_the_scenario_validates_and_plans():
    from suite.plan import plan_rows
    from suite.scenario import load_scenario
    from suite.scenario.presets import PRESETS

    path = ROOT / "scenarios" / "latency_alternatives.toml"
    r = run_suite("validate", path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_suite("plan", path)
    assert r.returncode == 0 and "| self_speculative | tp1 pp1 + draft layers:8 | 1 |" in r.stdout, r.stdout + r.stderr
    rows = {row["variant"].split()[0]: row for row in plan_rows(load_scenario(path))}
    base = PRESETS["gpt-base"]
    draft = F.parameters(F.Shape(base["num_layers"], base["hidden_size"], base["num_attention_heads"],
                                 base["num_attention_heads"], base["ffn_hidden_size"], 32000))["total"]
    assert rows["speculative"]["memory_per_gpu"] == rows["baseline"]["memory_per_gpu"] + 2 * draft  # bf16 weights
    assert rows["self_speculative"]["memory_per_gpu"] == rows["baseline"]["memory_per_gpu"]
    assert rows["cqil2_speculative"]["gpus"] == 2 and rows["cqil2_speculative"]["layout"].endswith("+ draft 12x768")
