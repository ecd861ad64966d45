"""LLM backends: in-process transformers (default), OpenAI-compatible servers (vLLM), vLLM offline."""
