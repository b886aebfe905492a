"""Checking: verify's bit check and functional check, the evaluation inputs, the search for fp16 factors."""
