"""The board's fixed counts (FORMAT.md 3, 3.4), in a module of the standard library only, so that a
command line can show them in its help before anything heavy is imported."""

BOARD_PORTS = 32  # the HBM pseudo-channels the board spreads weights over
BOARD_EMBEDDING_PARTS = 16  # the parts the board's host reads the embedding from
INT4_CODES = ("twos", "sign_magnitude")  # FORMAT.md 3.1: how the board reads a nibble (the board's; the older bitstream's)
# The choices the step scripts show in --help (the modules that use them import them from here)
ROPE_ORDERS = ("halves", "pairs", "glm")  # FORMAT.md 5 and 8: the value order of a RoPE table's row
DEFAULT_MAX_TOKEN = 2048  # positions in the RoPE table: the board's context buffer
SILU_TABLES = ("board", "fit")  # the board's SiLU table, or this project's fit
LM_HEAD_METHODS = ("rtn", "trunc", "checkpoint")  # lm_head.py --method
