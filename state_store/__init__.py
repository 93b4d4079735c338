"""Key schema, state codec and atomic commits on Redis (no torch imports here)."""
