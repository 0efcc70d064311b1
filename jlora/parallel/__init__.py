"""Several JAX processes and devices: which process decides, arrays no process holds whole, and reading a compiled
program's collectives and costs per device (`hlo`)."""
