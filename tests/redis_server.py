"""Test access to the private redis-server launcher (it lives in the package for the demo)."""

from sinkstream.cli.localredis import RedisServer, free_port, redis_server_binary

__all__ = ["RedisServer", "free_port", "redis_server_binary"]
