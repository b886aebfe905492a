"""The board's fixed counts (FORMAT.md 3, 3.4), in a module of the standard library only, so that a
command line can show them in its help before anything heavy is imported."""

BOARD_PORTS = 32  # the HBM pseudo-channels the board spreads weights over
BOARD_EMBEDDING_PARTS = 16  # the parts the board's host reads the embedding from
INT4_CODES = ("twos", "sign_magnitude")  # FORMAT.md 3.1: how the board reads a nibble (the board's; the older bitstream's)
