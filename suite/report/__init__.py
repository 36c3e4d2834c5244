"""Reading result records back: ``suite report`` (render) and ``suite compare`` (the regression gate).

    select   load records, keep the latest per (scenario, variant), baseline first, step-time statistics
    fmt      number formatting and markdown tables, shared by both commands
    render   ``suite report``: one comparison table per scenario (markdown, csv or json)
    compare  ``suite compare``: current vs stored baseline, exit 1 on a regression

Nothing here imports torch or megatron: reports are made on machines without either.
"""
