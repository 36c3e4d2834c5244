"""Hugging Face LLaMA import (suite.models.hf_import) against transformers' own forward.

The oracle: a small random ``transformers.LlamaForCausalLM`` (2 layers, hidden 64, 4 heads, 2 KV heads,
FFN 128, vocab 250, rope_theta 5000, rms_norm_eps 1e-6), built offline and written with
``save_pretrained``; every weight, norms included, is drawn at random so that a swapped or mis-fused
tensor shows. vocab 250 is padded to 256 by suite, so the zero pad rows are exercised too.

megatron runs in subprocesses (cpu_compat patches torch process-wide): ``torchrun`` of this file's
``worker`` with 1 process (TP=1) and with 2 processes (TP=2, PP=2, TP=1 x DP=2). Measured on CPU,
fp32: TP=1 and PP=2 give transformers' logits bit for bit (difference 0), TP=2 differs by at most
3.8e-6 in log-probs (its row-parallel reductions add in another order); the tests assert 1e-5 on
logits / log-probs and 1e-6 relative on the loss and bpb computed from them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MC_FILE = ROOT / "tests" / "data" / "eval" / "tiny_mc.jsonl"
TOL = 1e-5
TIMEOUT = 300

HF_CONFIG = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)

SCENARIO = """
name = "hf_import"
[model]
num_layers = 2
hidden_size = 64
num_attention_heads = 4
num_query_groups = 2
ffn_hidden_size = 128
vocab_size = 250
max_sequence_length = 64
rope_base = 5000.0
norm_epsilon = 1e-6
init = "hf:hf_model"
[workload]
seq_length = 32
global_batch = 2
micro_batch = 1
"""


# --- the megatron side, run under torchrun ---------------------------------------------------------

def worker(scenario: str, inputs: str, out: str, layouts: str) -> None:
    """For each layout TPxPP: import the HF model, log-probs of the test tokens and eval metrics."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from suite.eval import ByteTokenizer, multiple_choice, read_examples, text_metrics
    from suite.eval.megatron_lm import build
    from suite.launch import cpu_compat
    from suite.scenario import load_scenario

    cpu_compat.enable()
    dist.init_process_group("gloo")
    data = torch.load(inputs)
    results = {}
    for layout in layouts.split(","):
        tp, pp = map(int, layout.split("x"))
        ps.initialize_model_parallel(tp, pp)
        (spec,) = load_scenario(scenario, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
        logs = []
        lm = build(spec, log=logs.append)
        r = {"logprobs": lm(data["tokens"]), "log": logs,
             "text": text_metrics(lm, data["text"], seq_length=16),
             "mc": multiple_choice(lm, ByteTokenizer(), read_examples(MC_FILE))}
        if tp == pp == 1:  # raw logits, pad columns included
            tokens = data["tokens"]
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            with torch.no_grad():
                r["logits"] = lm.chunks[0](tokens, positions, None)
        results[layout] = r
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


# --- the transformers side, in the test process ----------------------------------------------------

@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms: away from 1, so that a swapped norm shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(base / "hf_model")
    (base / "scenario.toml").write_text(SCENARIO)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, HF_CONFIG["vocab_size"], (3, 24), generator=gen)
    text = torch.tensor(list(b"Some held-out text, in bytes, scored in rolling windows of 16 tokens. " * 2))
    torch.save({"tokens": tokens, "text": text}, base / "inputs.pt")

    def logprobs(t):
        with torch.no_grad():
            return torch.log_softmax(model(t).logits.float(), dim=-1)

    with torch.no_grad():
        logits = model(tokens).logits
    return {"dir": base, "model": model, "tokens": tokens, "text": text, "logits": logits, "lm": logprobs}


def run_worker(hf, nproc: int, layouts: str) -> dict:
    out = hf["dir"] / f"out_{nproc}_{layouts.replace(',', '_')}.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__)), "worker", str(hf["dir"] / "scenario.toml"), str(hf["dir"] / "inputs.pt"),
           str(out), layouts]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out)


def check_layout(hf, result: dict) -> None:
    from suite.eval import ByteTokenizer, multiple_choice, read_examples, text_metrics

    ref = hf["lm"](hf["tokens"])
    assert result["logprobs"].shape == ref.shape  # the 6 pad columns are not in suite.eval's log-probs
    assert (result["logprobs"] - ref).abs().max() < TOL
    text = text_metrics(hf["lm"], hf["text"], seq_length=16)
    assert result["text"]["loss"] == pytest.approx(text["loss"], rel=1e-6)
    assert result["text"]["bpb"] == pytest.approx(text["bpb"], rel=1e-6)
    mc = multiple_choice(hf["lm"], ByteTokenizer(), read_examples(MC_FILE))
    assert result["mc"]["acc"] == mc["acc"] and result["mc"]["acc_norm"] == mc["acc_norm"]
    for a, b in zip(result["mc"]["loglikelihoods"], mc["loglikelihoods"]):
        assert a == pytest.approx(b, abs=1e-3)


def test_logits_match_transformers_single_process(hf):
    """TP=1: logits equal transformers' (measured: bit for bit); the 6 pad logits are exactly 0."""
    (result,) = run_worker(hf, 1, "1x1").values()
    logits = result["logits"]
    assert logits.shape == (3, 24, 256)
    assert (logits[..., :250] - hf["logits"]).abs().max() < TOL
    assert torch.equal(logits[..., 250:], torch.zeros_like(logits[..., 250:]))
    check_layout(hf, result)
    assert "vocab 250 padded to 256 with 6 zero rows" in result["log"][0]


@pytest.mark.slow
def test_logits_match_transformers_tp2_pp2(hf):
    """2 processes: TP=2, PP=2 and TP=1 x DP=2 give transformers' log-probs (and eval metrics)."""
    results = run_worker(hf, 2, "2x1,1x2,1x1")
    for layout in ("2x1", "1x2", "1x1"):
        check_layout(hf, results[layout])


# --- conversion details and user errors (no megatron forward) ---------------------------------------

def test_fuse_qkv_is_grouped_interleaved():
    from suite.models.hf_import import fuse_qkv

    heads, groups, d, hidden = 4, 2, 2, 3
    q = torch.arange(heads * d).repeat_interleave(hidden).reshape(heads * d, hidden).float()
    k = 100 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    v = 200 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    rows = fuse_qkv(q, k, v, groups)[:, 0].tolist()
    # group 0: q heads 0, 1 then k0, v0; group 1: q heads 2, 3 then k1, v1
    assert rows == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]


def test_rope_theta_old_and_new_config_styles():
    from suite.models.hf_import import rope_theta

    assert rope_theta({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}) == 5e5  # transformers 5
    assert rope_theta({"rope_theta": 1e6, "rope_scaling": None}) == 1e6  # transformers 4
    assert rope_theta({}) == 10000.0


def _spec(tmp_path, **model):
    from suite.scenario import load_scenario

    text = SCENARIO + "\n[variants.v.model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items())
    (tmp_path / "s.toml").write_text(text)
    return load_scenario(tmp_path / "s.toml")[0]


def _config(**over) -> dict:
    cfg = {**HF_CONFIG, "model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"}}
    cfg.pop("rope_theta")
    return {**cfg, **over}


@pytest.mark.parametrize("model, key, fix", [
    ({"hidden_size": 128, "num_attention_heads": 4}, "model.hidden_size", "hidden_size = 64"),
    ({"num_query_groups": 4}, "model.num_query_groups", "num_query_groups = 2"),
    ({"ffn_hidden_size": 192}, "model.ffn_hidden_size", "ffn_hidden_size = 128"),
    ({"vocab_size": 256}, "model.vocab_size", "vocab_size = 250"),
    ({"rope_base": 10000.0}, "model.rope_base", "rope_base = 5000.0"),
    ({"norm_epsilon": 1e-5}, "model.norm_epsilon", "norm_epsilon = 1e-06"),
])
def test_shape_mismatch_names_the_key(tmp_path, model, key, fix):
    from suite.errors import UserError
    from suite.models.hf_import import check_config

    spec = _spec(tmp_path, **model)
    with pytest.raises(UserError) as e:
        check_config(spec, _config(), tmp_path)
    assert e.value.key == key and fix in e.value.fix, str(e.value)
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("over, words", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 32}, "head_dim 32"),
    ({"rope_parameters": {"rope_theta": 5000.0, "rope_type": "llama3"}}, "RoPE scaling 'llama3'"),
    ({"max_position_embeddings": 32}, "max_position_embeddings 32"),
])
def test_unsupported_checkpoints_are_user_errors(tmp_path, over, words):
    from suite.errors import UserError
    from suite.models.hf_import import check_config

    with pytest.raises(UserError) as e:
        check_config(_spec(tmp_path), _config(**over), tmp_path)
    assert words in str(e.value)


def test_matching_config_passes_and_missing_weights_are_a_user_error(tmp_path):
    from suite.errors import UserError
    from suite.models import hf_import

    spec = _spec(tmp_path)
    hf_import.check_config(spec, _config(), tmp_path)
    assert hf_import.scenario_model(_config()) == {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 128, "vocab_size": 250, "rope_base": 5000.0, "norm_epsilon": 1e-6}
    with pytest.raises(UserError, match="no model.safetensors"):
        hf_import._Tensors(spec, tmp_path)
    with pytest.raises(UserError, match="cannot read") as e:
        hf_import.read_config(spec, tmp_path)
    assert e.value.key == "model.init"


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
