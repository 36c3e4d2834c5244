"""megatron-core GPT models in LLaMA style: layer specs, construction, deterministic init."""
