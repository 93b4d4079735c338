"""Model engines: a StreamingLLM sink-KV cache for Hugging Face causal LMs, and RWKV state."""
