"""``suite analyze similarity SCENARIO``: how alike the inputs of consecutive layers are (CQIL's premise).

CQIL feeds every layer of a group the group's input, which is harmless where layer inputs barely
change from one layer to the next. For held-out batches (``data`` section: ``eval_batches`` of
``micro_batch`` windows of ``seq_length`` tokens) this runs the scenario's model (its first variant,
or ``--variant``) on one process without TP/PP/CQIL, records every layer's input x_i and measures

    S[i][j] = mean over tokens of cos(x_i, x_j)

Suggested grouping for a threshold T and degree P, scanning from layer 0: layers a..a+P-1 form a
group when S[a][a+k] >= T for every k < P (each layer's own input is within T of the input the
group hands it); the scan then continues after the group, else at a+1.

Writes ``similarity.md`` (the adjacent similarities, the grouping as a TOML line), ``similarity.json``
(the whole matrix) and ``similarity.png`` (heat map of S; needs matplotlib, else skipped with a
note). The weights are the scenario's ``[model] init``: the numbers say something about a trained
model only when it loads one (``checkpoint:PATH`` or ``hf:PATH``); random weights give a smooth,
uninformative matrix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from suite.errors import UserError
from suite.scenario import load_scenario


def suggest_groups(sim: list[list[float]], threshold: float, degree: int) -> list[list[int]]:
    """Groups of ``degree`` consecutive layers whose inputs stay within ``threshold`` of the first's."""
    groups, a = [], 0
    while a + degree <= len(sim):
        if degree > 1 and all(sim[a][a + k] >= threshold for k in range(1, degree)):
            groups.append(list(range(a, a + degree)))
            a += degree
        else:
            a += 1
    return groups


def layer_input_similarity(spec, batches: int) -> list[list[float]]:
    """S[i][j] over ``batches`` held-out batches (single process; joins a 1-rank process group)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from suite.data.tokens import TokenSource
    from suite.launch import cpu_compat
    from suite.models.build import build
    from suite.scenario.schema import ParallelConfig

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.enable()
    spec = dataclasses.replace(spec, parallel=ParallelConfig())  # the whole, unmodified model
    store = tempfile.NamedTemporaryFile(prefix="suite_similarity_", delete=False).name
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        ps.initialize_model_parallel()
        model = build(spec, log=lambda message: print(f"[suite] {message}"), inference=True).model
        inputs = []

        def keep_input(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            inputs.append(torch.nn.functional.normalize(x.float().flatten(0, 1), dim=-1))

        hooks = [layer.register_forward_pre_hook(keep_input, with_kwargs=True) for layer in model.decoder.layers]
        data, L = TokenSource(spec), spec.model.num_layers
        total = torch.zeros(L, L, dtype=torch.float64)
        with torch.no_grad():
            for i in range(batches):
                tokens = data.valid_batch(i, spec.workload.micro_batch)[:, :-1]
                if cuda:
                    tokens = tokens.cuda()
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
                inputs.clear()
                model(tokens, positions, None)
                x = torch.stack(inputs)  # [L, tokens, h], unit rows
                total += (torch.einsum("ith,jth->ij", x, x) / x.shape[1]).double().cpu()
        for h in hooks:
            h.remove()
        return (total / batches).tolist()
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        os.unlink(store)


def markdown(spec, sim, threshold: float, degree: int, batches: int, png: str | None) -> str:
    groups = suggest_groups(sim, threshold, degree)
    member = {layer for g in groups for layer in g}
    m, w = spec.model, spec.workload
    lines = [
        f"# Layer input similarity: {spec.scenario} / {spec.name}", "",
        f"Model: {m.num_layers} layers, hidden {m.hidden_size}, weights {m.init} (seed {w.seed}), {w.precision}. "
        f"Data: {batches} held-out batch(es) of {w.micro_batch} x {w.seq_length} tokens ({spec.data.source}"
        f"{': ' + spec.data.path if spec.data.path else ''}).", "",
        "cos(x_i, x_j): cosine similarity of the inputs of layers i and j, averaged over tokens.", "",
        "| layer i | cos(x_i, x_i+1) | in a suggested group |", "|---:|---:|:---:|",
    ]
    for i in range(len(sim) - 1):
        lines.append(f"| {i} | {sim[i][i + 1]:.4f} | {'yes' if i in member else ''} |")
    lines += ["", f"Suggested CQIL groups at threshold {threshold} with degree {degree} (a group's layers all "
              f"have inputs within {threshold} of the first layer's input):", ""]
    if groups:
        lines += ["```toml", "[parallel]", f"cqil = {{ groups = {groups}, bypass = 0 }}", "```"]
    else:
        lines.append(f"none: no {degree} consecutive layers reach {threshold}; lower --threshold or --degree.")
    lines += ["", f"Heat map of all pairs: {png}" if png else "Heat map skipped: matplotlib is not installed."]
    return "\n".join(lines) + "\n"


def heatmap(sim, title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sim, cmap="viridis", origin="upper")
    ax.set_xlabel("layer j (input)")
    ax.set_ylabel("layer i (input)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="cos(x_i, x_j)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def similarity_command(args) -> int:
    variants = load_scenario(args.scenario, args.overrides, args.variants)
    spec = variants[0]
    if not 0 < args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold} is not a cosine similarity in (0, 1].", fix="use e.g. 0.95.")
    if args.degree < 2:
        raise UserError(f"--degree {args.degree} groups nothing.", fix="use --degree 2 or more.")
    batches = args.batches or spec.workload.eval_batches
    out = Path(args.output or Path("results") / spec.scenario / "similarity")
    out.mkdir(parents=True, exist_ok=True)
    sim = layer_input_similarity(spec, batches)
    png = out / "similarity.png"
    drawn = heatmap(sim, f"{spec.scenario}/{spec.name}: cos of layer inputs", png)
    text = markdown(spec, sim, args.threshold, args.degree, batches, png.name if drawn else None)
    (out / "similarity.md").write_text(text)
    (out / "similarity.json").write_text(json.dumps({
        "scenario": spec.scenario, "variant": spec.name, "batches": batches, "threshold": args.threshold,
        "degree": args.degree, "matrix": sim, "adjacent": [sim[i][i + 1] for i in range(len(sim) - 1)],
        "suggested_groups": suggest_groups(sim, args.threshold, args.degree)}, indent=1))
    print(text, end="")
    print(f"[suite] wrote {out}/similarity.md, similarity.json" + (", similarity.png" if drawn else ""))
    return 0
