"""Named model shapes. LLaMA-1 shapes are from the LLaMA paper (Touvron et al., 2023)."""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    # A few hundred thousand parameters: the CPU default and the test model.
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=192, vocab_size=256, max_sequence_length=256),
    # GPT-Base class (12 x 768, ~110M non-embedding + embeddings), LLaMA-style blocks.
    "gpt-base": dict(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=2048,
                     vocab_size=32000, max_sequence_length=2048),
    # ~1.16B parameters: 20 x 2048, head dim 128.
    "gpt-1b": dict(num_layers=20, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                   vocab_size=32000, max_sequence_length=2048),
    "llama-7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                     vocab_size=32000, max_sequence_length=2048),
    "llama-13b": dict(num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824,
                      vocab_size=32000, max_sequence_length=2048),
    "llama-33b": dict(num_layers=60, hidden_size=6656, num_attention_heads=52, ffn_hidden_size=17920,
                      vocab_size=32000, max_sequence_length=2048),
    "llama-65b": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, ffn_hidden_size=22016,
                      vocab_size=32000, max_sequence_length=2048),
}


def default_ffn(hidden: int) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4h, rounded up to a multiple of 64."""
    return -(-(8 * hidden // 3) // 64) * 64
