"""The export steps: compile_sw, lm_head, hardware, embedding_tokens, and the chain of them."""
