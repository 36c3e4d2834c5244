"""The scenario language: malformed files are rejected with one helpful line, good files resolve right.

CPU only and torch-free: `suite validate` and `suite plan` must work on a laptop without torch.
Each file in tests/scenarios/bad/ is one malformed scenario; its `# expect:` lines hold fragments the
error must contain (files under _parts/ are helpers that other files extend, not cases).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from suite.errors import UserError, did_you_mean
from suite.plan import plan_rows
from suite.scenario import load_scenario
from suite.scenario.loader import apply_overrides, parse_override
from suite.scenario.presets import PRESETS, default_ffn
from suite.scenario.validate import check_world

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "scenarios" / "bad"
BAD_FILES = sorted(p for p in BAD.glob("*.toml") if not p.name.startswith("_"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "suite", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def by_name(variants) -> dict:
    return {v.name: v for v in variants}


# --- malformed files ------------------------------------------------------------------------------

def test_bad_corpus_is_large_enough():
    assert len(BAD_FILES) >= 30


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_scenario_is_rejected_with_a_helpful_message(path: Path, capsys, monkeypatch):
    """In-process (the CLI's main, as `python -m suite validate` runs it): any exception but a UserError
    propagates and fails the test; test_cli_validate_with_set covers the real process."""
    from suite.cli import main

    lines = path.read_text(encoding="utf-8-sig").splitlines()
    assert lines and lines[0].startswith("# expect:"), f"{path.name}: first line must be '# expect: ...'"
    expected = [line.split(":", 1)[1].strip() for line in lines if line.startswith("# expect:")]

    monkeypatch.chdir(ROOT)
    code = main(["validate", str(path.relative_to(ROOT))])
    out, err = capsys.readouterr()

    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    err = err.strip()
    assert len(err.splitlines()) == 1, f"expected one line:\n{err}"
    assert path.name in err, "the message must name the file"
    assert "Fix:" in err, "the message must say how to fix it"
    if not any(line.startswith("# no-key:") for line in lines):
        assert "key '" in err, "the message must name the key"
    for fragment in expected:
        assert fragment in err


# --- torch stays out ------------------------------------------------------------------------------

def _torch_modules_after(code: str) -> list[str]:
    probe = (f"import json, sys\n{code}\n"
             "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_suite_scenario_does_not_import_torch():
    assert _torch_modules_after("import suite.scenario") == []


def test_validate_and_plan_do_not_import_torch():
    code = ("from suite.cli import main\n"
            "assert main(['validate', 'scenarios/tiny.toml']) == 0\n"
            "assert main(['plan', 'scenarios/tiny.toml']) == 0")
    assert _torch_modules_after(code) == []


# --- extends --------------------------------------------------------------------------------------

BASE = """
name = "parent"
description = "the parent"
[model]
preset = "tiny"
num_layers = 8
[parallel]
tp = 2
[workload]
steps = 40
lr = 1e-3
"""


def test_extends_child_overrides_parent_and_sections_merge_key_by_key(tmp_path):
    write(tmp_path, "base.toml", BASE)
    child = write(tmp_path, "child.toml", 'extends = "base.toml"\n[workload]\nsteps = 10\n')
    (v,) = load_scenario(child)
    assert v.workload.steps == 10  # the child's key wins
    assert v.workload.lr == 1e-3  # the parent's other keys of the same section survive
    assert v.model.num_layers == 8 and v.parallel.tp == 2  # untouched sections come from the parent
    assert v.scenario == "child"  # a name is not inherited: the child's stem


def test_extends_chain_relative_to_each_file(tmp_path):
    write(tmp_path, "base.toml", BASE)
    write(tmp_path, "mid/child.toml", 'extends = "../base.toml"\n[workload]\nsteps = 10\n')
    leaf = write(tmp_path, "leaf.toml",
                 'name = "leaf-run"\nextends = "mid/child.toml"\n[workload]\nlr = 2e-3\n')
    (v,) = load_scenario(leaf)
    assert (v.scenario, v.workload.steps, v.workload.lr, v.model.num_layers) == ("leaf-run", 10, 2e-3, 8)


# --- variants and the baseline --------------------------------------------------------------------

VARIANTS = """
[model]
preset = "tiny"
[workload]
steps = 12
lr = 1e-3
[variants.a]
[variants.b.workload]
steps = 20
[variants.c.parallel]
tp = 2
"""


def test_variants_override_keys_and_default_baseline_is_the_first(tmp_path):
    vs = by_name(load_scenario(write(tmp_path, "s.toml", VARIANTS)))
    assert list(vs) == ["a", "b", "c"]
    assert [v.is_baseline for v in vs.values()] == [True, False, False]
    assert vs["a"].workload.steps == 12 and vs["a"].parallel.tp == 1
    assert vs["b"].workload.steps == 20 and vs["b"].workload.lr == 1e-3  # merged key by key
    assert vs["c"].parallel.tp == 2 and vs["c"].workload.steps == 12


def test_report_baseline_selects_the_baseline(tmp_path):
    path = write(tmp_path, "s.toml", VARIANTS + '[report]\nbaseline = "b"\n')
    assert {v.name: v.is_baseline for v in load_scenario(path)} == {"a": False, "b": True, "c": False}
    # Selecting variants keeps the baseline flag where it belongs.
    assert [(v.name, v.is_baseline) for v in load_scenario(path, only=["b", "c"])] == [("b", True), ("c", False)]


def test_no_variants_gives_one_default_baseline(tmp_path):
    (v,) = load_scenario(write(tmp_path, "s.toml", '[model]\npreset = "tiny"\n'))
    assert (v.name, v.is_baseline, v.scenario) == ("default", True, "s")


def test_unknown_variant_selection(tmp_path):
    with pytest.raises(UserError, match=r"no variant 'bb' \(did you mean 'b'\?\)") as e:
        load_scenario(write(tmp_path, "s.toml", VARIANTS), only=["bb"])
    assert e.value.fix and e.value.file


# --- --set ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, keys, value", [
    ("parallel.tp=2", ["parallel", "tp"], 2),
    ("workload.lr=3e-4", ["workload", "lr"], 3e-4),
    ("workload.lr=-0.5", ["workload", "lr"], -0.5),
    ('model.preset="gpt-base"', ["model", "preset"], "gpt-base"),
    ("model.preset=gpt-base", ["model", "preset"], "gpt-base"),  # unquoted: taken as a string
    ("data.path=builtin:shakespeare", ["data", "path"], "builtin:shakespeare"),
    ("report.title=My run", ["report", "title"], "My run"),
    ("parallel.sequence_parallel=true", ["parallel", "sequence_parallel"], True),
    ("eval.validation=false", ["eval", "validation"], False),
    (" parallel.tp = 4 ", ["parallel", "tp"], 4),
    ("tricks.some_trick.ratio=0.5", ["tricks", "some_trick", "ratio"], 0.5),
])
def test_parse_override(text, keys, value):
    got_keys, got = parse_override(text)
    assert got_keys == keys
    assert got == value and type(got) is type(value)


def test_override_without_equals_is_a_user_error():
    with pytest.raises(UserError, match="not of the form section.key=value"):
        parse_override("parallel.tp")


def test_apply_overrides_builds_nested_tables_and_copies():
    table = {"parallel": {"tp": 1}}
    out = apply_overrides(table, ["parallel.pp=2", "tricks.x.y=1"])
    assert out == {"parallel": {"tp": 1, "pp": 2}, "tricks": {"x": {"y": 1}}}
    assert table == {"parallel": {"tp": 1}}
    with pytest.raises(UserError, match="'tp' is not a section"):
        apply_overrides(table, ["parallel.tp.x=1"])


def test_set_wins_over_variants_and_ints_become_floats(tmp_path):
    path = write(tmp_path, "s.toml", VARIANTS)
    vs = load_scenario(path, ["parallel.tp=4", "model.num_query_groups=4", "workload.lr=1"])
    assert [v.parallel.tp for v in vs] == [4, 4, 4]
    assert vs[0].workload.lr == 1.0 and isinstance(vs[0].workload.lr, float)


def test_set_moves_the_baseline():
    vs = load_scenario(ROOT / "scenarios" / "tiny.toml", ["report.baseline=pp2"])
    assert {v.name for v in vs if v.is_baseline} == {"pp2"}


def test_cli_validate_with_set():
    r = run_cli("validate", "scenarios/tiny.toml", "--set", "parallel.tp=2")
    assert r.returncode == 0, r.stderr
    assert "scenarios/tiny.toml: ok (3 variants: dp, tp2, pp2)" in r.stdout

    r = run_cli("validate", "scenarios/tiny.toml", "--set", "parallel.tp=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "variant 'dp'" in r.stderr and "num_attention_heads 4 is not divisible by tp 3" in r.stderr

    r = run_cli("validate", "scenarios/tiny.toml", "--set", "parallel.tp")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Fix:" in r.stderr


# --- model shapes ---------------------------------------------------------------------------------

def test_preset_fills_unset_keys_and_explicit_keys_win(tmp_path):
    path = write(tmp_path, "s.toml", '[model]\npreset = "tiny"\nnum_layers = 8\nhidden_size = 128\n')
    (v,) = load_scenario(path)
    m, tiny = v.model, PRESETS["tiny"]
    assert (m.num_layers, m.hidden_size) == (8, 128)
    for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
                "max_sequence_length"):
        assert getattr(m, key) == tiny[key], key


def test_query_groups_default_to_heads():
    (v,) = load_scenario(ROOT / "scenarios" / "tiny.toml", ["model.preset=llama-7b"], only=["dp"])
    assert v.model.num_query_groups == v.model.num_attention_heads == 32
    assert v.model.ffn_hidden_size == 11008


def test_default_ffn_is_8h_over_3_rounded_up_to_64(tmp_path):
    for h in (64, 100, 768, 1000, 4096, 5120):
        assert default_ffn(h) == math.ceil(Fraction(8 * h, 3) / 64) * 64, h
    shape = "[model]\nnum_layers = 2\nhidden_size = 100\nnum_attention_heads = 4\nvocab_size = 300\n" \
            "max_sequence_length = 128\n"
    (v,) = load_scenario(write(tmp_path, "s.toml", shape))
    assert v.model.ffn_hidden_size == 320  # 8 * 100 / 3 = 266.7 -> 320
    assert v.model.num_query_groups == 4


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(tmp_path, preset):
    (v,) = load_scenario(write(tmp_path, "s.toml", f'[model]\npreset = "{preset}"\n'))
    assert v.model.num_layers == PRESETS[preset]["num_layers"]


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_validate(path):
    """On a fresh clone: every corpus a shipped scenario reads ships with the package (builtin:...)."""
    import tomllib

    table = tomllib.loads(path.read_text())
    paths = [t.get("data", {}).get("path") for t in (table, *table.get("variants", {}).values())]
    assert all(p is None or p.startswith("builtin:") for p in paths), f"{path.name} reads a file users lack"
    assert load_scenario(path)


def test_text_path_is_relative_to_the_scenario(tmp_path):
    write(tmp_path, "data/corpus.txt", "hello world\n" * 30)  # more than two windows of 129 tokens
    path = write(tmp_path, "s.toml",
                 '[model]\npreset = "tiny"\n[data]\nsource = "text"\npath = "data/corpus.txt"\n')
    assert load_scenario(path)


# --- world size -----------------------------------------------------------------------------------

def one_variant(tmp_path, parallel: str = "", workload: str = ""):
    text = f'[model]\npreset = "tiny"\n[parallel]\n{parallel}\n[workload]\n{workload}\n'
    (v,) = load_scenario(write(tmp_path, "s.toml", text))
    return v


def test_world_size(tmp_path):
    assert one_variant(tmp_path, "tp = 2\npp = 2\ndp = 2").world_size() == 8
    assert one_variant(tmp_path, "tp = 2\npp = 2\ndp = 2").world_size(launched=16) == 8  # dp is fixed
    assert one_variant(tmp_path, "tp = 2\npp = 2").world_size() == 4  # dp omitted: 1
    assert one_variant(tmp_path, "tp = 2").world_size(launched=6) == 6  # dp omitted: from the launch


def test_check_world_accepts_matching_launches(tmp_path):
    check_world(one_variant(tmp_path, "tp = 2\ndp = 2"), 4)
    check_world(one_variant(tmp_path, "tp = 2"), 8)  # dp 4: 8 % (2 x 4) == 0


def test_check_world_explicit_dp_must_match(tmp_path):
    with pytest.raises(UserError, match=r"tp 2 x pp 1 x dp 2 = 4 GPUs, but 8 processes") as e:
        check_world(one_variant(tmp_path, "tp = 2\ndp = 2"), 8)
    assert e.value.key == "parallel.dp" and e.value.variant == "default" and e.value.fix


def test_check_world_must_be_divisible_by_tp_pp(tmp_path):
    with pytest.raises(UserError, match=r"world size 6 is not divisible by tp 2 x pp 2") as e:
        check_world(one_variant(tmp_path, "tp = 2\npp = 2"), 6)
    assert "multiple of 4" in e.value.fix


def test_check_world_batch_against_derived_dp(tmp_path):
    v = one_variant(tmp_path, "", "global_batch = 8\nmicro_batch = 2")
    check_world(v, 4)
    with pytest.raises(UserError, match=r"global_batch 8 is not divisible by micro_batch 2 x dp 8") as e:
        check_world(v, 8)
    assert e.value.key == "workload.global_batch" and "multiple of 16" in e.value.fix


# --- plan -----------------------------------------------------------------------------------------

def parameters_by_hand(layers, hidden, heads, groups, ffn, vocab) -> int:
    """LLaMA-style GPT parameters, counted weight matrix by weight matrix."""
    vocab = math.ceil(vocab / 128) * 128  # padded so any TP size up to 128 splits it
    head_dim = hidden // heads
    q, k, v, out = hidden * hidden, hidden * groups * head_dim, hidden * groups * head_dim, hidden * hidden
    swiglu = hidden * ffn + hidden * ffn + ffn * hidden  # gate, up, down
    norms = hidden + hidden  # before attention, before the MLP
    embedding, final_norm, output_layer = vocab * hidden, hidden, hidden * vocab  # output is untied
    return embedding + layers * (q + k + v + out + swiglu + norms) + final_norm + output_layer


def test_tiny_preset_shapes_are_the_hand_counted_ones():
    assert PRESETS["tiny"] == dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                   ffn_hidden_size=192, vocab_size=256, max_sequence_length=256)
    assert parameters_by_hand(4, 64, 4, 2, 192, 256) == 229_952


def test_plan_parameter_count_matches_hand_count():
    rows = plan_rows(load_scenario(ROOT / "scenarios" / "tiny.toml"))
    assert [r["parameters"] for r in rows] == [parameters_by_hand(4, 64, 4, 2, 192, 256)] * 3
    # A vocabulary that needs padding (300 -> 384) and plain multi-head attention.
    rows = plan_rows(load_scenario(ROOT / "scenarios" / "tiny.toml",
                                   ["model.vocab_size=300", "model.num_query_groups=4"], only=["dp"]))
    assert rows[0]["parameters"] == parameters_by_hand(4, 64, 4, 4, 192, 300)


def test_cli_plan_tiny():
    r = run_cli("plan", "scenarios/tiny.toml")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].startswith("| variant | layout | GPUs | parameters |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:]]
    assert [row[:3] for row in rows] == [["dp (baseline)", "tp1 pp1 dp*", "1"],
                                         ["tp2", "tp2 pp1 dp*", "2"], ["pp2", "tp1 pp2 dp*", "2"]]
    hand = parameters_by_hand(4, 64, 4, 2, 192, 256)
    assert {row[3] for row in rows} == {f"{hand / 1e3:.0f} k"}  # 230 k, as `suite report` writes it
    assert {row[4] for row in rows} == {"1,024"}  # tokens/step: global_batch 8 x seq_length 128



# `suite plan` against GPU runs of the scenarios it plans: their committed records (reports/records/).
MEASURED = [("nightly_night4_h200", "nightly", ["dense", "recompute", "random_ltd", "vcycle"]),
            ("token_skipping_h200", "token_skipping", ["baseline", "random_ltd", "mod"]),
            ("growth_h200", "growth", ["baseline", "multilevel_2", "stacking"]),
            ("kernels_h200", "kernels", ["torch", "fused", "compile", "quality_bf16"])]


@pytest.mark.parametrize("records, scenario, variants", MEASURED, ids=[m[0] for m in MEASURED])
def test_plan_reads_what_the_gpu_runs_measured(records, scenario, variants):
    """The plan's FLOPs a step times the steps are the FLOPs the run counted step by step (for a technique
    that changes the work, the plan shows the run's mean), and its memory estimate is within -10% / +15% of
    the peak the GPU allocated (the feasibility check adds 10% + 1 GiB). The estimate this replaced
    (Korthikanti et al.'s 34 bytes per token·h and layer) read 28-31% low on the same runs."""
    lines = (ROOT / "reports" / "records" / f"{records}.jsonl").read_text().splitlines()
    recs = {r["variant"]: r for r in map(json.loads, lines)}
    specs = load_scenario(ROOT / "scenarios" / f"{scenario}.toml", only=variants)
    assert sorted(v.name for v in specs) == sorted(variants)
    for v, row in zip(specs, plan_rows(specs)):
        rec, m = recs[v.name], recs[v.name]["metrics"]
        ran = rec["config"]
        assert (ran["model"]["hidden_size"], ran["model"]["ffn_hidden_size"], ran["model"]["num_layers"],
                ran["model"].get("kernels", "torch"), ran["workload"]["micro_batch"], ran["workload"]["seq_length"],
                ran["parallel"]["recompute"]) == \
            (v.model.hidden_size, v.model.ffn_hidden_size, v.model.num_layers, v.model.kernels,
             v.workload.micro_batch, v.workload.seq_length, v.parallel.recompute), f"{records}/{v.name} ran another shape"
        assert row["flops_per_step"] * m["steps"] == pytest.approx(m["flops_total"], rel=1e-12), v.name
        assert 0.9 <= row["memory_per_gpu"] / m["peak_memory_bytes"] <= 1.15, (v.name, row["memory_per_gpu"],
                                                                               m["peak_memory_bytes"])

# --- errors ---------------------------------------------------------------------------------------

def test_user_error_is_one_line_naming_everything():
    e = UserError("tp is odd.", file="a.toml", variant="v", key="parallel.tp", fix="use 2.")
    assert str(e) == "a.toml: variant 'v': key 'parallel.tp': tp is odd. Fix: use 2."


def test_did_you_mean():
    assert did_you_mean("modle", ["model", "parallel"]) == " (did you mean 'model'?)"
    assert did_you_mean("zzz", ["model"]) == ""
    assert did_you_mean(3, ["dp", "tp2"]) == ""  # a wrongly typed value must not crash the message


# --- files and composition that once ended in a traceback or were accepted -------------------------

def validate_in_process(capsys, *args: str) -> tuple[int, str]:
    """`suite validate ARGS` through the CLI's main: (exit code, stderr); other exceptions propagate."""
    from suite.cli import main

    code = main(["validate", *args])
    return code, capsys.readouterr().err


def corpus_scenario(folder: Path, path: str, source: str = "text", extra: str = "") -> Path:
    return write(folder, "s.toml", f'[model]\npreset = "tiny"\n[data]\nsource = "{source}"\npath = "{path}"\n{extra}')


@pytest.mark.parametrize("case", ["symlink_loop", "nul_byte", "too_long", "folder", "fifo", "binary",
                                  "latin1_tail", "dangling_link"])
def test_unusable_corpus_files_are_user_errors(tmp_path, capsys, case):
    import os

    target = "c.txt"
    if case == "symlink_loop":
        os.symlink(tmp_path / "b.txt", tmp_path / "c.txt")
        os.symlink(tmp_path / "c.txt", tmp_path / "b.txt")
        expect = "loop of symbolic links"
    elif case == "nul_byte":
        target, expect = "c\\u0000.txt", "NUL byte"
    elif case == "too_long":
        target, expect = "x" * 5000, "longer than the system allows"
    elif case == "folder":
        (tmp_path / "c.txt").mkdir()
        expect = "is a folder, not a file"
    elif case == "fifo":
        os.mkfifo(tmp_path / "c.txt")  # reading it would block forever
        expect = "not a regular file"
    elif case == "binary":
        (tmp_path / "c.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 100)
        expect = "is binary (a NUL byte at offset 7)"
    elif case == "latin1_tail":
        (tmp_path / "c.txt").write_bytes(b"plain ascii text\n" * 10_000 + "caf\u00e9\n".encode("latin-1"))
        expect = "is not UTF-8 text (byte 170003)"
    else:
        os.symlink(tmp_path / "gone.txt", tmp_path / "c.txt")
        expect = "does not exist (looked for " + str(tmp_path / "gone.txt")
    path = corpus_scenario(tmp_path, target)
    code, err = validate_in_process(capsys, str(path))
    assert code == 2 and expect in err and "key 'data.path'" in err and "Fix:" in err, err


def test_a_character_split_by_the_tail_probe_is_not_an_error(tmp_path):
    from suite.data.sources import PROBE

    text = ("\u00e9" * PROBE).encode()  # 2 bytes a character: the tail probe starts mid-character or not
    for extra in (b"", b"a"):
        (tmp_path / "c.txt").write_bytes(extra + text)
        assert load_scenario(corpus_scenario(tmp_path, "c.txt"))


def test_megatron_pair_whose_sizes_disagree(tmp_path, capsys):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "ds.bin"), dtype=np.int32)
    for doc in ([1, 2, 3], [4, 5]):
        builder.add_document(np.array(doc, dtype=np.int32), [len(doc)])
    builder.finalize(str(tmp_path / "ds.idx"))
    path = corpus_scenario(tmp_path, "ds", source="megatron", extra="[workload]\nseq_length = 1\n")
    assert load_scenario(path)  # 5 tokens: a validation tail of 2 and a training split of 3
    with open(tmp_path / "ds.bin", "ab") as f:
        f.write(b"\0\0\0\0")  # one token more than the index describes
    code, err = validate_in_process(capsys, str(path))
    assert code == 2 and "holds 24 bytes, but ds.idx describes 20 (5 tokens of 4 bytes)" in err, err
    (tmp_path / "ds.idx").write_bytes((tmp_path / "ds.idx").read_bytes()[:30])
    code, err = validate_in_process(capsys, str(path))
    assert code == 2 and "ds.idx is truncated" in err, err


def test_a_corpus_shorter_than_two_windows_is_refused_at_validate(tmp_path, capsys):
    """Both splits need a window of seq_length + 1 tokens: an indexed dataset's count is exact, a text
    file's is bounded by its bytes and lines (no tokenizer runs at validate)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "ds.bin"), dtype=np.int32)
    builder.add_document(np.arange(9, dtype=np.int32), [9])
    builder.finalize(str(tmp_path / "ds.idx"))
    ok = corpus_scenario(tmp_path, "ds", source="megatron", extra="[workload]\nseq_length = 3\n")
    assert load_scenario(ok)  # 9 tokens: validation tail 4, training 5
    short = corpus_scenario(tmp_path, "ds", source="megatron", extra="[workload]\nseq_length = 4\n")
    code, err = validate_in_process(capsys, str(short))
    assert code == 2 and "holds 9 tokens" in err and "training split has 4, fewer than one sequence" in err, err
    write(tmp_path, "c.txt", "abc\n" * 40)  # 160 bytes, 40 lines: at most 242 tokens, fewer than 2 x 129
    code, err = validate_in_process(capsys, str(corpus_scenario(tmp_path, "c.txt")))
    assert code == 2 and "at most 242 tokens" in err and "shorter seq_length" in err, err


def test_truncated_or_missing_tokenizer_files(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    path = corpus_scenario(tmp_path, "builtin:shakespeare", extra='tokenizer = "hf:tok"\n')
    (tmp_path / "tok").mkdir()
    code, err = validate_in_process(capsys, str(path))
    assert code == 2 and "has neither tokenizer.json nor tokenizer_config.json" in err, err
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vo')
    code, err = validate_in_process(capsys, str(path))
    assert code == 2 and "is not valid JSON" in err and "key 'data.tokenizer'" in err, err
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0"}')  # JSON, not a tokenizer
    code, err = validate_in_process(capsys, str(path))
    assert code == 2 and "not a tokenizer the tokenizers library can read" in err, err


def test_bom_at_the_start_of_a_scenario_is_accepted(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'name = "bom"\n[model]\npreset = "tiny"\n')
    assert load_scenario(path)[0].scenario == "bom"


def test_long_extends_chains_without_recursion(tmp_path, capsys):
    write(tmp_path, "f0.toml", '[model]\npreset = "tiny"\n')
    for i in range(1, 70):
        write(tmp_path, f"f{i}.toml", f'extends = "f{i - 1}.toml"\n[workload]\nsteps = {i + 10}\n')
    (v,) = load_scenario(tmp_path / "f60.toml")  # 61 files: within the limit, later files win
    assert v.workload.steps == 70 and v.model.num_layers == 4
    code, err = validate_in_process(capsys, str(tmp_path / "f69.toml"))
    assert code == 2 and "the 'extends' chain is longer than 64 files" in err, err


def test_deeply_nested_values_are_refused(tmp_path, capsys):
    deep = write(tmp_path, "deep.toml", "x = " + "[" * 3000 + "]" * 3000 + "\n")
    code, err = validate_in_process(capsys, str(deep))
    assert code == 2 and "nested" in err, err
    dotted = write(tmp_path, "dotted.toml", "[model]\n" + ".".join(["a"] * 40) + " = 1\n")
    code, err = validate_in_process(capsys, str(dotted))
    assert code == 2 and "nested more than 16 deep" in err, err


def test_validate_checks_and_reports_every_file(tmp_path, capsys):
    good = write(tmp_path, "good.toml", '[model]\npreset = "tiny"\n')
    bad = write(tmp_path, "bad.toml", '[model]\npreset = "tinyy"\n')
    code, err = validate_in_process(capsys, str(bad), str(good), str(tmp_path / "missing.toml"), str(tmp_path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4, err
    assert "bad.toml" in lines[0] and "missing.toml: file not found" in lines[1] and "is a folder" in lines[2]
    assert lines[3] == "3 of 4 scenario files are invalid"
    from suite.cli import main

    assert main(["validate", str(good), str(good)]) == 0
    assert capsys.readouterr().out.count("good.toml: ok") == 2


# --- noise and help -------------------------------------------------------------------------------

def test_expected_library_warnings_are_hidden_unless_verbose(monkeypatch):
    import warnings

    from suite import quiet

    monkeypatch.delenv(quiet.ENV, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("something else entirely", UserWarning)  # not ours to hide
    assert [str(w.message) for w in seen] == ["something else entirely"]
    monkeypatch.setenv(quiet.ENV, "1")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
    assert len(seen) == 1


def test_help_has_no_raw_markup_and_takes_verbose_anywhere():
    from suite.cli import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    todo = [parser]
    while todo:  # every subcommand, nested ones included
        for action in todo.pop()._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    texts.append(sub.format_help())
                    todo.append(sub)
    for text in texts:
        assert "``" not in text and "%%" not in text and "**" not in text, text
    assert parser.parse_args(["validate", "x.toml", "--verbose"]).verbose
    assert parser.parse_args(["--verbose", "plan", "x.toml"]).verbose
    assert not hasattr(parser.parse_args(["plan", "x.toml"]), "verbose")


def test_binary_task_file_is_caught_at_validate_time(tmp_path, capsys):
    (tmp_path / "tasks.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    path = write(tmp_path, "s.toml", '[model]\npreset = "tiny"\n[workload]\nkind = "accuracy"\n[data]\n'
                 'source = "text"\npath = "builtin:shakespeare"\n[eval]\ntasks = ["tasks.jsonl"]\n')
    code, err = validate_in_process(capsys, str(path))
    assert code == 2 and "key 'eval.tasks[0]': the task file" in err and "is binary" in err, err


def test_every_numeric_key_has_a_range_or_choices():
    """Ranges are how absurd numbers are refused: a new numeric key must declare one (doc(..., range=...))."""
    import typing
    from dataclasses import fields

    import dataclasses

    from suite import registry
    from suite.scenario.schema import SECTIONS, parse_range

    registry.load()  # techniques' [tricks.<name>] and parallel modes' [parallel] <name> tables too
    todo = [*SECTIONS.items(), *((f"tricks.{k}", t.config) for k, t in registry.TRICKS.items()),
            *((f"parallel.{k}", m.config) for k, m in registry.PARALLEL_MODES.items())]
    missing = []
    while todo:
        name, cls = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            nested = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(t)]
            if nested:  # a table inside the table ([parallel.cqil.finetune])
                todo.append((f"{name}.{f.name}", nested[0]))
                continue
            if any(t in str(hints[f.name]) for t in ("int", "float")):
                if f.metadata.get("range"):
                    low, _, high, _ = parse_range(f.metadata["range"])
                    assert low < high and math.isfinite(high), (name, f.name)
                elif not f.metadata.get("choices"):
                    missing.append(f"{name}.{f.name}")
    assert not missing, f"numeric keys without a range: {missing}"
