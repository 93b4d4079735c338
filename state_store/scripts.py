"""Every Lua script sinkstream runs on Redis, in one place.

Each script touches only keys of one stream (one hash tag), so it runs on a single Redis
Cluster slot. Keys are always passed in KEYS, never built inside the script.
"""

from __future__ import annotations
