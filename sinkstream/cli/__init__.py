"""The ``sinkstream`` command line (``sinkstream.cli.app``): the roof, imported by nothing.

Kept empty of imports so that ``sinkstream.cli.localredis`` (the private redis-server the
demo and the tests start) loads without the whole command line.
"""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``sinkstream`` script."""
    from sinkstream.cli.app import main as run

    run()
