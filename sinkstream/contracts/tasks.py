"""The Celery task names other processes send work under (``app.send_task(name, ...)``).

Sent by name so a sender (the CLI's ``ask``, the HTTP gateway, the dispatcher) never imports
the worker's task code, and torch with it. ``workers/tasks.py`` registers them.
"""

from __future__ import annotations

#: apply the next batches of one stream: args ``[stream_id]``
PROCESS_STREAM = "sinkstream.process_stream"
#: an on-demand summary, or with a question an answer: args ``[stream_id, request, question]``
SUMMARIZE = "sinkstream.summarize"
