"""The HTTP gateway (``sinkstream serve``): producers that speak HTTP, followers in a browser.

A floor of its own between the command line and the worker | producer floor: it publishes
through the producer library, sends asks to the workers by task name, reads the output
streams and the lag like the exporter does. ``app.create_app(settings)`` is the ASGI factory;
``docs/http.md`` is the reference.
"""
