"""The NNX front-end: module surgery on `nnx.Module` graphs (public names in `jlora.nnx`)."""
