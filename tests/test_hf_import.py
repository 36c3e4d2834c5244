"""Hugging Face import (suite.models.hf_import) and export (suite.models.hf_export) against transformers.

The oracle: small random models built by ``transformers`` and written with ``save_pretrained``, one per
family (2 layers, hidden 64, 4 heads, 2 KV heads, FFN 128, vocab 250):

* ``llama``: untied, a non-integer rope_theta (1234.75: truncating it to 1234 moves the logits);
* ``llama_tied``: tied embeddings (save_pretrained drops lm_head);
* ``llama3``: Llama 3.1's RoPE scaling (rope_type llama3, factor 8, rope_theta 5e5: with head size 16
  the low, medium and high frequency bands all occur);
* ``qwen2``: q/k/v biases (drawn at random, not zero), rope_theta 1e6;
* ``mistral``: sliding_window 64 = max_sequence_length, which masks nothing and is accepted.

Every weight, norms and biases included, is drawn at random so that a swapped or mis-fused tensor
shows; vocab 250 is padded to 256 by suite, so the zero pad rows are exercised too.

megatron runs in subprocesses (cpu_compat patches torch process-wide): ``torchrun`` of this file's
``worker`` with 1 process (every family at TP=1) and one 2-process job (every family at TP=2, then at
PP=2). Each layout also exports the model back to a Hugging Face folder, checked here bit for bit
against the source tensors and by transformers' logits; the 2-process job also saves the Qwen2 and
Llama-3 models as suite checkpoints at TP=2 and exports them after loading at PP=2 (the q/k/v biases
and the RoPE scaling travel with the checkpoint). Measured on CPU, fp32, every family: TP=1 and PP=2
give transformers' logits bit for bit, TP=2 within 5.7e-6 in log-probs (its row-parallel reductions
add in another order); the exports give the suite model's log-probs exactly. The tests assert 1e-4.
Without the llama3 scaling the llama3 family's logits move by 0.06, and with rope_theta truncated to
1234 the llama family's by 0.003: both far outside the tolerance.
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
TOL = 1e-4
TIMEOUT = 300

HF_CONFIG = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# family: (transformers class names, config changes)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 1234.75}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 5e5, "rope_scaling": LLAMA3}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_theta": 1e6}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64, "rope_theta": 10000.0}),
}

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


def hf_config(family: str):
    import transformers

    config_cls, _, over = FAMILIES[family]
    kwargs = {**HF_CONFIG, **over}
    theta, scaling = kwargs.pop("rope_theta"), kwargs.pop("rope_scaling", None)
    # transformers >= 5 takes the RoPE settings as rope_parameters, older versions as rope_theta / rope_scaling
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    else:
        kwargs.update(rope_theta=theta, rope_scaling=scaling)
    return getattr(transformers, config_cls)(**kwargs)


def scenario_text(family: str, init: str | None = None) -> str:
    theta = {**HF_CONFIG, **FAMILIES[family][2]}["rope_theta"]
    return SCENARIO.replace("rope_base = 5000.0", f"rope_base = {float(theta)!r}").replace(
        'init = "hf:hf_model"', f'init = "{init or "hf:" + family}"')


# --- the megatron side, run under torchrun ---------------------------------------------------------

def worker(base: str, layouts: str) -> None:
    """For each layout TPxPP and family: import the HF model, log-probs of the test tokens, export it
    back to a Hugging Face folder; llama also scores held-out text and multiple choice."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from suite.eval import ByteTokenizer, multiple_choice, read_examples, text_metrics
    from suite.eval.megatron_lm import build
    from suite.launch import cpu_compat
    from suite.models import checkpoint, hf_export
    from suite.scenario import load_scenario

    cpu_compat.enable()
    dist.init_process_group("gloo")
    base = Path(base)
    data = torch.load(base / "inputs.pt")
    results = {}
    for layout in layouts.split(","):
        tp, pp = map(int, layout.split("x"))
        ps.initialize_model_parallel(tp, pp)
        over = [f"parallel.tp={tp}", f"parallel.pp={pp}"]
        for family in FAMILIES:
            (spec,) = load_scenario(base / f"{family}.toml", over)
            logs = []
            lm = build(spec, log=logs.append)
            r = {"logprobs": lm(data["tokens"]), "log": logs,
                 "inv_freq": lm.chunks[0].rotary_pos_emb.inv_freq.clone()}
            if family == "llama":
                r.update(text=text_metrics(lm, data["text"], seq_length=16),
                         mc=multiple_choice(lm, ByteTokenizer(), read_examples(MC_FILE)))
            if tp == pp == 1:  # raw logits, pad columns included
                tokens = data["tokens"]
                positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
                with torch.no_grad():
                    r["logits"] = lm.chunks[0](tokens, positions, None)
            hf_export.export(spec, lm.chunks, base / "export" / f"{family}_{layout}", log=logs.append)
            if tp == 2 and family in ("qwen2", "llama3"):  # a suite checkpoint at TP=2, exported at PP=2 below
                checkpoint.save(spec, lm.chunks, log=logs.append)
            if pp == 2 and family in ("qwen2", "llama3"):
                (saved,) = load_scenario(base / f"{family}_ckpt.toml", over)
                chunks = build(saved, log=logs.append).chunks
                hf_export.export(saved, chunks, base / "export" / f"{family}_ckpt_{layout}", log=logs.append)
            results[f"{family}/{layout}"] = r
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        torch.save(results, base / f"out_{layouts.replace(',', '_')}.pt")
    dist.destroy_process_group()


# --- the transformers side, in the test process ----------------------------------------------------

@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("hf")
    models = {}
    for i, (family, (_, model_cls, _)) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = getattr(transformers, model_cls)(hf_config(family)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):  # away from 1, so that a swapped norm shows
                    p.copy_(1 + 0.3 * torch.randn_like(p))
                else:  # weights and Qwen2's biases
                    p.normal_(0, 0.15)
        model.save_pretrained(base / family)
        models[family] = model
        text = scenario_text(family)
        if family in ("qwen2", "llama3"):  # the TP=2 run saves a checkpoint, the PP=2 run exports it
            text = text.replace("[workload]", f'[workload]\nsave_checkpoint = "ckpt_{family}"')
            (base / f"{family}_ckpt.toml").write_text(scenario_text(family, f"checkpoint:ckpt_{family}"))
        (base / f"{family}.toml").write_text(text)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, HF_CONFIG["vocab_size"], (3, 24), generator=gen)
    text = torch.tensor(list(b"Some held-out text, in bytes, scored in rolling windows of 16 tokens. " * 2))
    torch.save({"tokens": tokens, "text": text}, base / "inputs.pt")

    def logprobs(family, t):
        with torch.no_grad():
            return torch.log_softmax(models[family](t).logits.float(), dim=-1)

    return {"dir": base, "models": models, "tokens": tokens, "text": text, "lm": logprobs}


def run_worker(hf, nproc: int, layouts: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__)), "worker", str(hf["dir"]), layouts]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return torch.load(hf["dir"] / f"out_{layouts.replace(',', '_')}.pt")


def source_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check_export(hf, family: str, folder: Path, logprobs: torch.Tensor) -> None:
    """The exported folder: the source's tensors bit for bit (tied stays tied), and transformers
    loading it computes the suite model's log-probs."""
    import transformers

    src, got = source_tensors(hf["dir"] / family), source_tensors(folder)
    assert sorted(got) == sorted(src), (family, sorted(set(got) ^ set(src)))
    for name, t in src.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), (family, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(model).__name__ == FAMILIES[family][1]
    with torch.no_grad():
        exported = torch.log_softmax(model(hf["tokens"]).logits.float(), dim=-1)
    assert (exported - logprobs).abs().max() < TOL, family


def check_layout(hf, family: str, result: dict) -> None:
    from suite.eval import ByteTokenizer, multiple_choice, read_examples, text_metrics

    ref = hf["lm"](family, hf["tokens"])
    assert result["logprobs"].shape == ref.shape  # the 6 pad columns are not in suite.eval's log-probs
    assert (result["logprobs"] - ref).abs().max() < TOL, family
    if family != "llama":
        return
    lm = lambda t: hf["lm"](family, t)  # noqa: E731
    text = text_metrics(lm, hf["text"], seq_length=16)
    assert result["text"]["loss"] == pytest.approx(text["loss"], rel=1e-6)
    assert result["text"]["bpb"] == pytest.approx(text["bpb"], rel=1e-6)
    mc = multiple_choice(lm, ByteTokenizer(), read_examples(MC_FILE))
    assert result["mc"]["acc"] == mc["acc"] and result["mc"]["acc_norm"] == mc["acc_norm"]
    for a, b in zip(result["mc"]["loglikelihoods"], mc["loglikelihoods"]):
        assert a == pytest.approx(b, abs=1e-3)


def test_families_match_transformers_single_process(hf):
    """TP=1, every family: logits equal transformers'; the 6 pad logits are exactly 0; the export
    round-trips bit for bit and transformers reads it back with the same logits."""
    results = run_worker(hf, 1, "1x1")
    for family, model in hf["models"].items():
        result = results[f"{family}/1x1"]
        with torch.no_grad():
            ref = model(hf["tokens"]).logits
        logits = result["logits"]
        assert logits.shape == (3, 24, 256)
        assert (logits[..., :250] - ref).abs().max() < TOL, family
        assert torch.equal(logits[..., 250:], torch.zeros_like(logits[..., 250:]))
        check_layout(hf, family, result)
        check_export(hf, family, hf["dir"] / "export" / f"{family}_1x1", result["logprobs"])
    # the exact float RoPE base (1234.75, not 1234)
    want = 1.0 / (1234.75 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert torch.equal(results["llama/1x1"]["inv_freq"], want)
    log = results["llama_tied/1x1"]["log"][0]
    assert "vocab 250 padded to 256 with 6 zero rows" in log and "tied embeddings copied" in log


@pytest.mark.slow
def test_families_match_transformers_tp2_pp2(hf):
    """One 2-process job: every family at TP=2 and at PP=2 gives transformers' log-probs, and exports
    (gathered over TP, one file per pipeline stage) round-trip bit for bit; suite checkpoints of Qwen2
    and Llama-3 saved at TP=2 export the same tensors after loading at PP=2."""
    results = run_worker(hf, 2, "2x1,1x2")
    for family in FAMILIES:
        for layout in ("2x1", "1x2"):
            check_layout(hf, family, results[f"{family}/{layout}"])
            check_export(hf, family, hf["dir"] / "export" / f"{family}_{layout}", results[f"{family}/{layout}"]["logprobs"])
    for family in ("qwen2", "llama3"):
        check_export(hf, family, hf["dir"] / "export" / f"{family}_ckpt_1x2", results[f"{family}/1x2"]["logprobs"])
    assert (hf["dir"] / "export" / "llama_1x2" / "model.safetensors.index.json").is_file()


def test_export_hf_command(hf, tmp_path):
    """`suite export-hf`: one process, hf: init -> a folder transformers reads, tied as the source was;
    a random init is a one-line user error."""
    sys.path.insert(0, str(ROOT / "tests"))
    from check_worker import run_suite

    out = tmp_path / "exported"
    (hf["dir"] / "llama_tied" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    r = run_suite("export-hf", hf["dir"] / "llama_tied.toml", "-o", out, timeout_s=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Hugging Face folder written to" in r.stdout and "tied embeddings" in r.stdout
    check_export(hf, "llama_tied", out, hf["lm"]("llama_tied", hf["tokens"]))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'  # the tokenizer travels
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not an export")
    r = run_suite("export-hf", hf["dir"] / "llama_tied.toml", "-o", tmp_path / "taken", timeout_s=180)
    assert r.returncode == 2 and "is not a Hugging Face folder" in r.stderr, r.stderr
    (tmp_path / "random.toml").write_text(SCENARIO.replace('init = "hf:hf_model"', 'init = "random"'))
    r = run_suite("export-hf", tmp_path / "random.toml", "-o", tmp_path / "nothing", timeout_s=180)
    assert r.returncode == 2 and "init is random" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_llama3_inverse_frequencies_are_transformers():
    """megatron-core's llama3 RoPE scaling, as gpt.build_chunks asks for it, against transformers'
    _compute_llama3_parameters, for Llama 3.1 (factor 8) and 3.2 (factor 32) at head size 128."""
    transformers = pytest.importorskip("transformers")
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    for factor in (8.0, 32.0):
        cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                       rope_parameters={**LLAMA3, "factor": factor, "rope_theta": 500000.0})
        want, _ = _compute_llama3_parameters(cfg, "cpu")
        got = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500000.0, rope_scaling=True,
                              rope_scaling_factor=factor, use_cpu_initialization=True).inv_freq
        assert torch.allclose(got, want, rtol=1e-6, atol=0), (factor, (got - want).abs().max())
        assert not torch.allclose(got, RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500000.0,
                                                       use_cpu_initialization=True).inv_freq)


# --- conversion details and user errors (no megatron forward) ---------------------------------------

def test_fuse_qkv_is_grouped_interleaved():
    from suite.models.hf_import import fuse_qkv

    heads, groups, d, hidden = 4, 2, 2, 3
    q = torch.arange(heads * d).repeat_interleave(hidden).reshape(heads * d, hidden).float()
    k = 100 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    v = 200 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    fused = fuse_qkv(q, k, v, groups)
    rows = fused[:, 0].tolist()
    # group 0: q heads 0, 1 then k0, v0; group 1: q heads 2, 3 then k1, v1
    assert rows == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    from suite.models.hf_export import split_qkv

    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)))
    bias = split_qkv(fused[:, 0], heads, groups)  # 1-D (Qwen2's biases)
    assert all(torch.equal(a, b[:, 0]) for a, b in zip(bias, (q, k, v)))


def test_rope_theta_old_and_new_config_styles():
    from suite.models.hf_import import rope_theta

    assert rope_theta({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}) == 5e5  # transformers 5
    assert rope_theta({"rope_theta": 1e6, "rope_scaling": None}) == 1e6  # transformers 4
    assert rope_theta({}) == 10000.0
    assert rope_theta({"rope_theta": 1234.75}) == 1234.75  # never truncated


def test_architecture_from_config():
    from suite.models.hf_import import architecture

    assert architecture({"model_type": "qwen2", "rope_theta": 1e6}) == {"qkv_bias": True, "rope_scaling_factor": None}
    llama31 = {"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert architecture(llama31) == {"qkv_bias": False, "rope_scaling_factor": 8.0}
    llama32 = {"model_type": "llama", "rope_parameters": {"type": "llama3", "factor": 32.0, "rope_theta": 5e5}}
    assert architecture(llama32)["rope_scaling_factor"] == 32.0


def _spec(tmp_path, **model):
    from suite.scenario import load_scenario

    text = SCENARIO.replace('init = "hf:hf_model"', 'init = "random"')  # check_config gets the config itself
    text += "\n[variants.v.model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items())
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


@pytest.mark.parametrize("over, words, fix", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'", "LLaMA, Mistral and Qwen2"),
    ({"attention_bias": True}, "attention_bias is true", "model_type qwen2"),
    ({"mlp_bias": True}, "mlp_bias is true", "mlp_bias false"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'", "hidden_act silu"),
    ({"head_dim": 32}, "head_dim 32", "head_dim is hidden_size / num_attention_heads"),
    ({"rope_parameters": {"rope_theta": 5000.0, "rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'",
     "llama3 scaling"),
    ({"rope_parameters": {"rope_theta": 5000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}},
     "rope_scaling.low_freq_factor", "low_freq_factor 1, high_freq_factor 4"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'", "llama3 scaling"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding-window attention (16 tokens)",
     "max_sequence_length (and seq_length) <= 16"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     "sliding-window attention (16 tokens)", "<= 16"),
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types", "causal attention"),
    ({"quantization_config": {"quant_method": "gptq"}}, "'quantization_config' is unknown",
     "delete it from a copy of config.json"),
    ({"attn_logit_softcapping": 50.0}, "'attn_logit_softcapping' is unknown", "delete it"),
    ({"max_position_embeddings": 32}, "max_position_embeddings 32", "max_sequence_length <= 32"),
])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, over, words, fix):
    """Each key that would change the function is named, with its own fix."""
    from suite.errors import UserError
    from suite.models.hf_import import check_config

    with pytest.raises(UserError) as e:
        check_config(_spec(tmp_path), _config(**over), tmp_path)
    assert words in str(e.value) and fix in e.value.fix, str(e.value)


@pytest.mark.parametrize("over", [
    {"model_type": "mistral", "sliding_window": 64},  # window = max_sequence_length: masks nothing
    {"model_type": "mistral", "sliding_window": None},
    {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 16, "max_window_layers": 0},
    {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},  # no layer
    {"rope_parameters": {"rope_theta": 5000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"torch_dtype": "bfloat16", "pretraining_tp": 1, "architectures": ["LlamaForCausalLM"], "use_cache": True},
])
def test_checkpoints_that_compute_suites_function_are_accepted(tmp_path, over):
    from suite.models.hf_import import check_config

    check_config(_spec(tmp_path), _config(**over), tmp_path)


def test_validate_checks_the_hf_folder(tmp_path):
    """`suite validate` (no torch, no weights read): a missing config.json, an unsupported architecture
    and a [model] that differs from config.json are one-line errors naming the key."""
    sys.path.insert(0, str(ROOT / "tests"))
    from check_worker import run_suite

    (tmp_path / "s.toml").write_text(SCENARIO)
    cases = [(None, "cannot read", "model.init"), ([1, 2], "not a JSON object", "model.init"),
             (_config(num_attention_heads="4"), "num_attention_heads is '4', not a positive integer", "model.init"),
             (_config(rope_parameters="5000"), "a value of the wrong type", "model.init"),
             (_config(sliding_window=16, model_type="mistral"), "sliding-window attention (16 tokens)", "model.init"),
             (_config(num_key_value_heads=4), "num_query_groups is 2 but", "model.num_query_groups")]
    for cfg, words, key in cases:
        (tmp_path / "hf_model").mkdir(exist_ok=True)
        if cfg is not None:
            (tmp_path / "hf_model" / "config.json").write_text(json.dumps(cfg))
        r = run_suite("validate", tmp_path / "s.toml")
        assert r.returncode == 2 and words in r.stderr and f"key '{key}'" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "hf_model" / "config.json").write_text(json.dumps(_config()))
    r = run_suite("validate", tmp_path / "s.toml")
    assert r.returncode == 0, r.stderr


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
