"""Quantized frozen bases for QLoRA: the `QuantizedArray` box (NF4, int8) and the tree functions around it."""
