"""Quantization: GPTQ (one matrix, one layer at a time, the Triton kernel), calibration, the quality
report and the output layer's round-to-nearest rules."""
