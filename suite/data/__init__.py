"""Token sources: synthetic tokens for speed, real text for accuracy."""
