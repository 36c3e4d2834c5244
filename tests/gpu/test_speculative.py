"""Speculative decoding with its draft and verify forwards in CUDA graphs, on one GPU, against the target's
plain greedy decoding (the defining property: the output is the target's greedy output token for token).

In ONE worker subprocess (``python THIS_FILE --worker OUT DIR``, a world of one over NCCL on GPU 0): a
4-layer model (h 256, vocab 1024, random weights, fp32 so that no near-tie can flip a token), 2 sequences,
a 16-token prompt, 20 generated tokens; drafts: its first layer (self-speculative) and a second 2-layer
model, k = 1 and 4. Each request is run twice on the captured graphs (the graphs are replayed for every
draft and verify forward; positions and tokens are copied into their static buffers).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the worker harness, in the worker too
from check_worker import result, run_worker, worker_main  # noqa: E402

pytestmark = pytest.mark.gpu

BATCH, PROMPT, GEN = 2, 16, 20
MODEL = """[model]
preset = "tiny"
num_layers = 4
hidden_size = 256
num_attention_heads = 4
vocab_size = 1024
max_sequence_length = 256
[workload]
kind = "inference"
precision = "fp32"
[tricks.speculative]
draft = {draft}
k = {k}
"""
DRAFTS = {"self1": '"layers:1"',
          "small": '{ preset = "tiny", num_layers = 2, hidden_size = 128, num_attention_heads = 2 }'}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    return run_worker(__file__, tmp_path_factory.mktemp("speculative_gpu_worker"), 600)


# --- run in the worker subprocess -------------------------------------------------------------------

def check_graphed_speculative_gives_the_greedy_tokens(folder):
    import torch

    from suite.scenario import load_scenario
    from suite.tricks.speculative.engine import Speculative

    out = {}
    for name, draft in DRAFTS.items():
        for k in (1, 4):
            path = Path(folder) / f"{name}_{k}.toml"
            path.write_text(MODEL.format(draft=draft, k=k))
            (spec,) = load_scenario(path)
            engine = Speculative(spec, spec.tricks["speculative"], log=lambda *_: None)
            prompt = torch.randint(0, 1024, (BATCH, PROMPT), generator=torch.Generator().manual_seed(5)).cuda()
            target = engine.target
            target.allocate(BATCH, PROMPT + GEN + 1)
            target.prefill(prompt)
            reference = [target.tokens.clone()]
            for _ in range(GEN):
                target.decode()
                reference.append(target.tokens.clone())
            reference = torch.cat(reference, dim=1)
            target.release()
            engine.allocate(BATCH, engine.capacity(PROMPT, GEN))
            engine.use_static_forwards(prompt, graph=True)
            graphed = [engine.static[0].graph is not None, engine.static[1].graph is not None]
            first = engine.request(prompt, GEN)
            again = engine.request(prompt, GEN)
            engine.close()
            out[f"{name} k{k}"] = {"captured": graphed, "equal": torch.equal(first, reference),
                                   "again": torch.equal(again, reference),
                                   "acceptance": engine.stats.acceptance_rate()}
    return out


CHECKS = [check_graphed_speculative_gives_the_greedy_tokens]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    sys.exit(worker_main(CHECKS, sys.argv[2], sys.argv[3], cuda=True))


# --- pytest: assertions on the worker's results -----------------------------------------------------

def test_graphed_speculative_decoding_gives_the_targets_greedy_tokens(worker):
    data = result(worker, "graphed_speculative_gives_the_greedy_tokens")
    print(f"\n{data}")
    assert len(data) == 4
    for case, r in data.items():
        assert r["captured"] == [True, True], case
        assert r["equal"] and r["again"], case
