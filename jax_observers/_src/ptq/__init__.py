"""Post-training quantization over parameter pytrees (``quantize_params``) and the qwix bridge."""
