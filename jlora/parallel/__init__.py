"""Several JAX processes: which process decides, and arrays no process holds whole."""
