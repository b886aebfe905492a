"""The formats: the byte layout of every file (writer and reader side by side), the packed folder's reader,
the RoPE and SiLU tables, GPTQ checkpoints, model dimensions and the gate for what the board runs."""
