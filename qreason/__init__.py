"""qreason: measure how quantization damages LLM reasoning, explain it, and produce data to repair it."""

__version__ = "0.1.0"
