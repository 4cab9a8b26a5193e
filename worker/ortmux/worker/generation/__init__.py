"""Text generation below the scheduler: what a model's files say about generating (eos, context,
tokenizer), sampling, stop rules and incremental text, and the KV cache's bound."""
