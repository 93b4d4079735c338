"""The worker's batch steps: one stream's batch, exactly once (``processor``), several
streams in one forward (``multistream``), and the pieces they are made of."""
