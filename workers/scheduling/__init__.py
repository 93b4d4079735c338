"""Scheduling: one task per stream with input (``scheduler``), found by one leading
dispatcher (``dispatcher``)."""
