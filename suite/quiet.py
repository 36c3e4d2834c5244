"""Third-party noise out of the user's way, set once at the entry point before megatron-core is imported.

A two-process CPU run of the default scenario printed about 20 warnings per run that say nothing about the
measurement: megatron-core announcing, once per module and per process, that Apex and Transformer Engine
are missing (the fallbacks are what `suite` uses on purpose), a deprecated config scope `suite` never sets,
torch deprecating a collective that megatron-core calls, and, on CPU, advice about a CUDA setting. They are
filtered by category and message (nothing else is hidden), and megatron-core's loggers show errors only.

``--verbose`` (or ``SUITE_VERBOSE=1``) leaves Python's and the libraries' defaults alone; it is passed on
to the processes a launch starts through the environment.
"""
from __future__ import annotations

import logging
import os
import warnings

ENV = "SUITE_VERBOSE"

# (category, regex matched at the start of the message): each one seen in a default run, with its source.
EXPECTED = [
    # megatron-core optimizer, clip_grads, FSDP mixed precision, norms: the fallbacks suite relies on
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    # megatron-core TransformerConfig.__post_init__, for its own default cuda_graph_scope
    (UserWarning, r"full scope is deprecated"),
    # torch 2.13 deprecates the collective megatron-core's tensor/sequence parallel layers call
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
]
# Advice that only means something on a GPU (megatron-core's tensor-parallel layers).
CPU_ONLY = [(UserWarning, r"When using async grad allreduce it is recommended to set the environment variable "
                          r"CUDA_DEVICE_MAX_CONNECTIONS")]


def verbose() -> bool:
    return os.environ.get(ENV) == "1"


def install(show_all: bool = False) -> None:
    """Called first by the command line (every process of a run goes through it)."""
    if show_all:
        os.environ[ENV] = "1"  # inherited by torchrun and its workers
    if verbose():
        return
    for category, message in EXPECTED:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def install_cpu() -> None:
    """Also hide GPU-only advice; called by the CPU compatibility layer once it knows there is no GPU."""
    if not verbose():
        for category, message in CPU_ONLY:
            warnings.filterwarnings("ignore", message=message, category=category)
