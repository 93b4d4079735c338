from tests.redis_server import RedisServer


def test_private_server_is_not_the_shared_one(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    assert redis_server.client().ping()


def test_aof_server_keeps_data_across_restart(redis_aof_server: RedisServer) -> None:
    redis_aof_server.client().set("k", "v")
    redis_aof_server.restart(hard=True)
    assert redis_aof_server.client().get("k") == b"v"
