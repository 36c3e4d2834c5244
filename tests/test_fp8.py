"""FP8 training (suite.models.fp8) on CPU, through torchao's float8 emulation (the same casts and scales,
then a high-precision matmul): the layer against an fp32 reference, the model built with float8 linear
submodules and the same initial weights and checkpoint layout as bf16, a `suite run` that trains, and
validation's refusals.

Tolerances: e4m3 (inputs, weights) keeps 3 mantissa bits, a relative step of 2^-3 (rounding error up to
6%), e5m2 (output gradients) 2 bits. Tensorwise-scaled GEMMs of random operands then land within a few
percent of fp32 in relative Frobenius norm: 8% for the forward, 15% for the gradients, which pass e5m2.

megatron-core checks run in one worker subprocess (``python THIS_FILE --worker``, see ``check_worker``).
"""
from __future__ import annotations

import json
import math
import sys

import pytest
from check_worker import ROOT, result, run_suite, run_worker, worker_main

from suite.errors import UserError

UNIT = ROOT / "tests" / "scenarios" / "fp8" / "unit.toml"
FORWARD_TOL, GRAD_TOL = 0.08, 0.15


def _spec(*overrides, variant="fp8"):
    from suite.scenario import load_scenario

    return {v.name: v for v in load_scenario(UNIT, list(overrides))}[variant]


# --- validation (no torch) -------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["parallel.tp=2"], "parallel.tp"),
    (["model.hidden_size=72", "model.num_attention_heads=4", "model.num_query_groups=4"], "model.hidden_size"),
    (["model.ffn_hidden_size=200"], "model.ffn_hidden_size"),
    # 16 heads of 4: q/k/v width (16 + 2 x 1) x 4 = 72
    (["model.num_attention_heads=16", "model.num_query_groups=1"], "model.num_query_groups"),
])
def test_validate_refuses_what_float8_gemms_cannot_run(overrides, key):
    with pytest.raises(UserError) as e:
        _spec(*overrides)
    assert e.value.key == key and "fp8" in str(e.value) and e.value.fix, e.value
    # the same shape in bf16 is fine: the refusal is fp8's
    bf16 = [o for o in overrides if not o.startswith("parallel.")] or ["parallel.tp=1"]
    _spec(*bf16, 'workload.precision="bf16"')


def test_validate_refuses_fp8_without_torchao(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(UserError) as e:
        _spec()
    assert e.value.key == "workload.precision" and "pip install 'suite[fp8]'" in e.value.fix


def test_gpu_without_float8_tensor_cores_is_refused(monkeypatch):
    """At build time on CUDA: compute capability below 8.9 (an A100 is 8.0) is a user error naming the fix."""
    import torch

    from suite.models import fp8

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    for capability, refused in [((8, 0), True), ((8, 9), False), ((9, 0), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        if refused:
            with pytest.raises(UserError) as e:
                fp8.check_device(_spec())
            assert e.value.key == "workload.precision" and "8.0" in str(e.value) and "bf16" in e.value.fix
        else:
            fp8.check_device(_spec())


@pytest.mark.parametrize("mode, input_grad_fast, weight_grad_fast", [
    ("forward", False, False), ("forward_and_input_grad", True, False), ("all", True, True)])
def test_fast_accumulation_setting_reaches_every_float8_layer(mode, input_grad_fast, weight_grad_fast):
    """The GEMM configs each swapped linear submodule is built with: the output GEMM always fast (torchao's
    default), the gradient GEMMs as the setting says."""
    from suite.models import fp8, gpt

    layer = fp8.layer_spec(_spec(f'workload.fp8_fast_accumulation="{mode}"'), gpt.layer_spec())
    attention, mlp = layer.submodules.self_attention.submodules, layer.submodules.mlp.submodules
    linears = [attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2]
    for linear in linears:
        cfg = linear.params["float8_config"]
        assert cfg.gemm_config_output.use_fast_accum
        assert cfg.gemm_config_grad_input.use_fast_accum is input_grad_fast
        assert cfg.gemm_config_grad_weight.use_fast_accum is weight_grad_fast


def test_cli_exits_2_naming_the_key():
    proc = run_suite("validate", UNIT, "--set", "parallel.tp=2")
    assert proc.returncode == 2, proc.stderr
    assert "key 'parallel.tp'" in proc.stderr and "fp8" in proc.stderr and "Traceback" not in proc.stderr


# --- the single-process worker --------------------------------------------------------------------

def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_layer_matches_fp32_reference(tmp):
    """Forward, input and weight gradients of one float8 layer against the fp32 GEMMs; a token count that
    is not a multiple of 16 (padded rows) gives the same values as torchao's layer on the unpadded rows."""
    from types import SimpleNamespace

    import torch
    from torchao.float8.float8_linear import Float8Linear

    from suite.models import fp8

    cfg = SimpleNamespace(use_cpu_initialization=True, params_dtype=torch.float32)
    out = {}
    for cls, shape in [(fp8.Float8ColumnLinear, (64, 128)), (fp8.Float8RowLinear, (192, 64))]:
        layer = cls(*shape, config=cfg, bias=False, float8_config=fp8.float8_config())
        with torch.no_grad():
            layer.weight.normal_(0.0, 0.02)
        x = torch.randn(32, 2, shape[0], requires_grad=True)  # [s, b, h] as megatron passes it
        y, bias = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        x_ref = x.detach().clone().requires_grad_()
        w_ref = layer.weight.detach().clone().requires_grad_()
        y_ref = x_ref @ w_ref.t()
        y_ref.backward(g)
        # padding: 7 x 3 = 21 rows
        x21 = torch.randn(7, 3, shape[0])
        padded, _ = layer(x21)
        plain = Float8Linear.forward(layer, x21)
        out[cls.__name__] = {"bias": bias, "forward": _rel(y, y_ref), "grad_input": _rel(x.grad, x_ref.grad),
                             "grad_weight": _rel(layer.weight.grad, w_ref.grad),
                             "padded_vs_plain": float((padded - plain).abs().max()),
                             "padded_shape": list(padded.shape)}
    return out


def _models(spec_fp8, spec_bf16):
    from suite.models.build import build

    return build(spec_fp8, log=lambda *a: None).model, build(spec_bf16, log=lambda *a: None).model


def check_model_uses_float8_layers_with_the_same_weights(tmp):
    """The four linear submodules of every layer are float8, the LM head and embeddings are not; every
    parameter has the bf16 model's name and initial value (init by global name, output projections
    included); the sharded checkpoint keys and global shapes are the bf16 model's."""
    from suite.models import fp8

    model, ref = _models(_spec(), _spec(variant="bf16"))
    names = fp8.float8_layers(model)
    params, ref_params = dict(model.named_parameters()), dict(ref.named_parameters())
    sd, ref_sd = model.sharded_state_dict(), ref.sharded_state_dict()

    def layout(state):
        return {k: [type(v).__name__, str(getattr(v, "global_shape", None)),
                    str(getattr(v, "axis_fragmentations", None)), getattr(v, "key", None)]
                for k, v in state.items()}

    return {"float8": names, "param_names_equal": sorted(params) == sorted(ref_params),
            "max_param_diff": max(float((params[n].float() - p.float()).abs().max()) for n, p in ref_params.items()),
            "proj_std": float(params["decoder.layers.0.self_attention.linear_proj.weight"].float().std()),
            "qkv_std": float(params["decoder.layers.0.self_attention.linear_qkv.weight"].float().std()),
            "dtype": str(params["decoder.layers.0.mlp.linear_fc1.weight"].dtype),
            "sharded_layout_equal": layout(sd) == layout(ref_sd), "sharded_keys": len(sd)}


def check_model_loss_and_gradients_close_to_bf16(tmp):
    """One forward/backward of the tiny model on real text: loss and gradients near the bf16 model's."""
    import torch

    from suite.data.tokens import TokenSource

    spec, ref_spec = _spec(), _spec(variant="bf16")
    model, ref = _models(spec, ref_spec)
    batch = TokenSource(spec).train_batch(0, spec.workload.micro_batch)
    tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    losses, grads = [], []
    for m in (model, ref):
        m.bfloat16().train()
        logits = m(tokens, positions, None)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        losses.append(float(loss))
        grads.append({n: p.grad.float() for n, p in m.named_parameters()})
    worst = max(_rel(grads[0][n], g) for n, g in grads[1].items() if "linear_" in n)
    return {"loss_fp8": losses[0], "loss_bf16": losses[1], "worst_linear_grad_rel": worst}


def check_technique_layer_spec_keeps_its_state(tmp):
    """random-LTD hands in its own layer spec whose params hold the runtime's live state: the fp8 swap keeps
    that object (a copy would freeze the kept length), and a kept length of 9 tokens x 2 sequences (rows
    padded to 32) trains forward and backward, near the bf16 model's loss."""
    import torch

    from suite.data.tokens import TokenSource
    from suite.models import fp8, gpt
    from suite.models.build import build
    from suite.tricks.random_ltd import RandomLTDConfig
    from suite.tricks.random_ltd.layer import RandomLTDLayer, RandomLTDRuntime

    out = {}
    for variant in ("fp8", "bf16"):
        spec = _spec(variant=variant)
        runtime = RandomLTDRuntime(spec, RandomLTDConfig(min_kept=9, step_size=1, schedule_steps=100))
        model = build(spec, runtime.layer_spec(gpt.layer_spec()), log=lambda *a: None).model
        runtime.begin_step(0)
        dropping = [m for m in model.modules()
                    if isinstance(m, RandomLTDLayer) and m.layer_number - 1 in m.drop_state.layers]
        batch = TokenSource(spec).train_batch(0, spec.workload.micro_batch)
        tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        model.bfloat16().train()
        logits = model(tokens, positions, None)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        out[variant] = {"shared_state": all(m.drop_state is runtime.state for m in dropping), "dropping": len(dropping),
                        "kept": runtime.state.kept, "loss": float(loss),
                        "grads_finite": all(bool(p.grad.isfinite().all()) for p in model.parameters()),
                        "float8": len(fp8.float8_layers(model))}
    return out


CHECKS = [check_layer_matches_fp32_reference, check_model_uses_float8_layers_with_the_same_weights,
          check_model_loss_and_gradients_close_to_bf16, check_technique_layer_spec_keeps_its_state]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("fp8"))


def test_layer_matches_fp32_reference(worker):
    for name, r in result(worker, "layer_matches_fp32_reference").items():
        assert r["bias"] is None, name
        assert 1e-4 < r["forward"] < FORWARD_TOL, (name, r)  # > 1e-4: the float8 casts really happen
        assert 1e-4 < r["grad_input"] < GRAD_TOL and 1e-4 < r["grad_weight"] < GRAD_TOL, (name, r)
        assert r["padded_vs_plain"] < 1e-6 and r["padded_shape"][:2] == [7, 3], (name, r)


def test_model_uses_float8_layers_with_the_same_weights(worker):
    r = result(worker, "model_uses_float8_layers_with_the_same_weights")
    expected = [f"decoder.layers.{i}.{part}" for i in range(4) for part in
                ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")]
    assert sorted(r["float8"]) == sorted(expected)  # the LM head and embeddings stay bf16
    assert r["param_names_equal"] and r["max_param_diff"] == 0.0
    assert r["proj_std"] == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)  # std/sqrt(2L) by name
    assert r["qkv_std"] == pytest.approx(0.02, rel=0.1)
    assert r["dtype"] == "torch.bfloat16"
    assert r["sharded_layout_equal"] and r["sharded_keys"] > 0


def test_model_loss_and_gradients_close_to_bf16(worker):
    r = result(worker, "model_loss_and_gradients_close_to_bf16")
    assert math.isfinite(r["loss_fp8"]) and abs(r["loss_fp8"] - r["loss_bf16"]) < 0.02, r
    assert r["worst_linear_grad_rel"] < GRAD_TOL, r


def test_technique_layer_spec_keeps_its_state(worker):
    r = result(worker, "technique_layer_spec_keeps_its_state")
    assert r["fp8"]["float8"] == 16 and r["bf16"]["float8"] == 0, r
    assert r["fp8"]["kept"] == 9 and r["fp8"]["dropping"] > 0 and r["fp8"]["shared_state"], r
    assert r["fp8"]["grads_finite"] and abs(r["fp8"]["loss"] - r["bf16"]["loss"]) < 0.02, r


# --- `suite run` -----------------------------------------------------------------------------------

def test_suite_run_trains_in_fp8(tmp_path):
    """On CPU too: the compat layer lets megatron's bf16 optimizer take CPU tensors (fp32 master weights)."""
    proc = run_suite("run", UNIT, "--variant", "fp8", "--set", "workload.steps=8", "--out", tmp_path / "out",
                     timeout_s=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["config"]["workload"]["precision"] == "fp8"
    curve = [loss for _, loss in record["metrics"]["loss_curve"]]
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0] - 0.5, curve


if __name__ == "__main__" and "--worker" in sys.argv:
    i = sys.argv.index("--worker")
    sys.exit(worker_main(CHECKS, sys.argv[i + 1], sys.argv[i + 2]))
