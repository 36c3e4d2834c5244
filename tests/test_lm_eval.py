"""lm-evaluation-harness for real: ``lm_eval.simple_evaluate`` runs local tasks through suite's ``LM``
adapter (suite.eval.lm_eval_adapter.SuiteLM), and its numbers equal suite's built-in scorers on the
same data.

The tasks are YAML files over JSON-lines files this test writes (no hub access: HF_DATASETS_OFFLINE /
HF_HUB_OFFLINE are set, the datasets cache is a temporary folder): 40 random multiple-choice examples
(``output_type: multiple_choice``: acc, acc_norm) and 12 random texts (``loglikelihood_rolling``:
word and byte perplexity, bits per byte). The model is test_eval's bigram table over bytes, so the
harness, not a model, is what is tested; tests/test_hf_import.py checks a megatron model's log-probs
against transformers'. lm-eval runs in a subprocess (it reads the offline switches at import).
"""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from suite.eval.local_tasks import write_task

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 24  # shorter than the longest contexts and texts: truncation and rolling windows occur

def write_tasks(folder: Path) -> None:
    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abq z") for _ in range(rng.randint(1, 6))).strip() or "a"  # noqa: E731
    with open(folder / "mc.jsonl", "w") as f:
        for _ in range(40):
            choices = [" ".join(word() for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 4))]
            context = "Q: " + " ".join(word() for _ in range(rng.randint(2, 8))) + rng.choice(["", " "])
            f.write(json.dumps({"context": context, "choices": choices, "label": rng.randrange(len(choices))}) + "\n")
    with open(folder / "text.jsonl", "w") as f:
        for _ in range(12):
            f.write(json.dumps({"text": " ".join(word() for _ in range(rng.randint(3, 40)))}) + "\n")
    write_task(folder / "mc.yaml", "suite_local_mc", folder / "mc.jsonl")
    write_task(folder / "text.yaml", "suite_local_text", folder / "text.jsonl", kind="rolling")


def harness(folder: str) -> None:
    """In the subprocess: simple_evaluate both tasks with SuiteLM over the bigram; results to JSON."""
    sys.path.insert(0, str(ROOT / "tests"))
    import lm_eval
    from lm_eval.tasks import TaskManager
    from test_eval import bigram

    from suite.eval import ByteTokenizer
    from suite.eval.lm_eval_adapter import SuiteLM

    calls = []

    def counted(tokens):
        calls.append(tuple(tokens.shape))
        return bigram(tokens)

    lm = SuiteLM(counted, ByteTokenizer(), max_length=MAX_LENGTH, batch_size=32)
    out = lm_eval.simple_evaluate(model=lm, tasks=["suite_local_mc", "suite_local_text"],
                                  task_manager=TaskManager(include_path=folder), log_samples=True)
    samples = {task: sorted(([s["doc_id"], [r[0] for r in s["resps"]]] for s in rows), key=lambda s: s[0])
               for task, rows in out["samples"].items()}
    Path(folder, "out.json").write_text(json.dumps({"results": out["results"], "samples": samples, "calls": calls}))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[dev]')")
    folder = tmp_path_factory.mktemp("lm_eval")
    write_tasks(folder)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder / "cache"),
           "HF_HOME": str(folder / "hf_home")}
    from check_worker import subprocess_env

    r = subprocess.run([sys.executable, __file__, str(folder)], cwd=ROOT, env={**subprocess_env(), **env},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    return folder, json.loads((folder / "out.json").read_text())


def test_multiple_choice_through_the_harness_equals_the_builtin_scorer(evaluated):
    from test_eval import bigram

    from suite.eval import ByteTokenizer, multiple_choice, read_examples

    folder, out = evaluated
    got = out["results"]["suite_local_mc"]
    ours = multiple_choice(bigram, ByteTokenizer(), read_examples(folder / "mc.jsonl"), max_length=MAX_LENGTH)
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # the data tells the two apart
    assert got["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert got["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    assert got["acc_stderr,none"] == pytest.approx(ours["acc_stderr"], rel=1e-9)
    assert got["acc_norm_stderr,none"] == pytest.approx(ours["acc_norm_stderr"], rel=1e-9)
    for (_, lls), want in zip(out["samples"]["suite_local_mc"], ours["loglikelihoods"]):
        assert [ll for ll, _ in lls] == pytest.approx(want, abs=1e-9)


def test_rolling_loglikelihood_through_the_harness_equals_the_builtin_perplexity(evaluated):
    """Per document the harness's log-likelihood is suite's rolling one (the byte tokenizer has no
    BOS/EOT: the first byte is context); bits per byte = -sum ll / (sum bytes * ln 2) over documents."""
    from test_eval import bigram

    from suite.eval import rolling_loglikelihood

    folder, out = evaluated
    texts = [json.loads(line)["text"] for line in (folder / "text.jsonl").read_text().splitlines()]
    ours = [rolling_loglikelihood(bigram, list(t.encode()), MAX_LENGTH)[0] for t in texts]
    got = [lls[0] for _, lls in out["samples"]["suite_local_text"]]
    assert got == pytest.approx(ours, abs=1e-9)
    total_bytes = sum(len(t.encode()) for t in texts)
    want_bpb = -sum(ours) / (total_bytes * math.log(2))
    result = out["results"]["suite_local_text"]
    assert result["bits_per_byte,none"] == pytest.approx(want_bpb, rel=1e-9)
    assert result["byte_perplexity,none"] == pytest.approx(2 ** want_bpb, rel=1e-9)


def test_requests_are_batched(evaluated):
    """Every window of a task goes through the model in batches of up to 32: 40 examples of 2-4
    choices are a handful of calls, not one call per request."""
    folder, out = evaluated
    requests = sum(len(json.loads(line)["choices"]) for line in (folder / "mc.jsonl").read_text().splitlines())
    windows = requests + 12 + 5  # the 12 texts' windows: at least one each (max_length 24: a few more)
    assert max(b for b, _ in out["calls"]) == 32
    assert len(out["calls"]) < windows / 8


if __name__ == "__main__":
    harness(sys.argv[1])
