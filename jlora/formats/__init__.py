"""Files: atomic writes, jlora's versioned checkpoints (adapters, quantized bases) with checksums, and PEFT's
on-disk format (`formats.peft`)."""
