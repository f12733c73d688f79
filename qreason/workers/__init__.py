"""Side environments (quantization, training, lm-eval) and the one protocol qreason speaks with them. The
worker modules run in those environments and import nothing of qreason but ``workers.protocol``."""
