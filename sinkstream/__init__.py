"""sinkstream: keep a language model listening to many live text streams."""

__version__ = "0.1.0"
