"""The metrics speculative decoding declares (torch-free: the workload writes them, readers read them)."""
from __future__ import annotations

from suite.metrics.declare import Metric, declare

MS_PER_TOKEN = declare(Metric("ms_per_token", "ms/token", "time", "lower", "median",
                              doc="speculative decoding: a timed request's decode time over its generated tokens "
                                  "(one sample per request)"))
VERIFY_STEP = declare(Metric("verify_step", "ms", "time", "lower", "median",
                             doc="speculative decoding: one verify step (k draft forwards, one target forward "
                                 "over the k proposals, acceptance), per timed step"))
ACCEPTANCE_RATE = declare(Metric("acceptance_rate", "fraction", "rate", "higher", "tolerance", tolerance=0.05,
                                 doc="speculative decoding: accepted draft tokens / proposed, per timed request "
                                     "(fixed by weights and prompts: compared with a tolerance)"))
TOKENS_PER_VERIFY = declare(Metric("tokens_per_verify", "tokens", "rate", "higher", "tolerance", tolerance=0.05,
                                   doc="speculative decoding: tokens emitted per verify step (accepted + 1), per "
                                       "timed request"))
