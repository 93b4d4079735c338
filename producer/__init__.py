"""Publish text chunks onto sinkstream input streams (no torch, no GPU stack needed)."""
