"""Launching: the SPMD runner under torchrun, the per-variant launcher, the CPU compat layer."""
