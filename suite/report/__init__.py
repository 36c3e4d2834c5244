"""Reading result records back: ``suite report`` (render) and ``suite compare`` (the regression gate).

    select    load records (``suite.records.read_records``: checked, schema 1 upgraded), keep the latest per
              (scenario, variant), baseline first, step-time statistics
    fmt       number formatting, markdown tables and output files, shared by the commands
    render    ``suite report``: one comparison table per scenario (markdown, csv or json)
    quality   cost to reach a validation loss; plots: the loss curves behind it
    latency   inference scenarios: one row per (variant, batch, prompt, gen, graph) point
    accuracy  accuracy scenarios: held-out quality per model, zero-shot multiple choice
    measures  measures taken at schedule positions (variable-shape runs), from their raw samples
    plugins   the one registration point through which techniques add report parts and record fields
    compare, gate, export   ``suite compare`` and ``suite export`` over the records' measures

Nothing here imports torch or megatron (reports are made on machines without either), and nothing
here names a technique: techniques contribute through ``plugins``.
"""
