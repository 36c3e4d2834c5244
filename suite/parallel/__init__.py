"""Ways of spreading one model over GPUs beyond megatron-core's own TP/PP/DP: one package per parallel
mode, each registered through ``suite.registry``."""
