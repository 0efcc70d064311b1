"""Several adapters over one base: named sets, banks for mixed batches, weighted combination."""
