"""The board's arithmetic: its fp16 datapath emulator, fp16 statistics and the fp16 rescaling rules."""
