"""Compiler-VCU128: GPTQ checkpoints to the files the VCU128 LLM accelerator loads (see FORMAT.md)."""

__version__ = "0.1.0"
