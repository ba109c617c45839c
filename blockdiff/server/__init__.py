"""The OpenAI-compatible server: `blockdiff serve` (see docs/serving.md)."""
