"""Hugging Face PEFT's adapter directories, both ways: config, tensor names and layouts, the two files."""
