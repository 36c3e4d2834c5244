"""Workloads: what a variant runs (training now; inference latency with CQIL)."""
