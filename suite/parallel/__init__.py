"""Ways of spreading one model over GPUs beyond megatron-core's own TP/PP/DP (CQIL: ``cqil.py``)."""
