"""The gateway under its own least-privilege Redis user (``deploy/redis/acl.conf``, the shipped
rules with a test password): publishing, status, notes, SSE and an ask answered by a real
worker all work, Redis refuses it nothing, and it cannot write what workers own."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from tests.integration.gateway.server import GatewayProcess, Tokens, bearer, gateway_env
from tests.integration.gateway.sse import read_events
from tests.integration.pipeline.harness import WorkerPool, wait_until, worker_env

ACL_FILE = Path(__file__).resolve().parents[3] / "deploy" / "redis" / "acl.conf"
PASSWORDS = {"worker": "w-test-pw", "producer": "p-test-pw", "gateway": "g-test-pw"}


class AclRedis(RedisServer):
    """redis-server with the shipped users; ``default`` kept as the test's admin."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        rules = ACL_FILE.read_text().replace("user default off",
                                             "user default on nopass ~* &* +@all")
        for user, password in PASSWORDS.items():
            rules = rules.replace(f">CHANGE-ME-{user}", f">{password}")
        self.conf = workdir / "redis.conf"
        self.conf.write_text(rules)

    def args(self) -> list[str]:
        base = super().args()
        return [base[0], str(self.conf), *base[1:]]

    def url_for(self, user: str) -> str:
        return f"redis://sinkstream-{user}:{PASSWORDS[user]}@127.0.0.1:{self.port}/0"


@pytest.mark.timeout(300)
def test_the_gateway_works_under_its_least_privilege_user(tmp_path: Path) -> None:
    server = AclRedis(tmp_path / "redis").start()
    admin = server.client()
    tokens = Tokens.create(tmp_path / "tokens.json")
    pool = WorkerPool(worker_env(server.url_for("worker"), tmp_path,
                                 SINKSTREAM_SUMMARY_EVERY_TOKENS="40",
                                 SINKSTREAM_SUMMARY_MAX_NEW_TOKENS="16",
                                 SINKSTREAM_TORCH_THREADS="1"), tmp_path)
    url = server.url_for("gateway")
    gateway = GatewayProcess(gateway_env(url, tokens.path), tmp_path / "gateway.log")
    try:
        pool.start("acl")
        gateway.start()
        base, h = f"{gateway.url}/v1/streams/acme-acl", bearer(tokens.acme)
        turns = [{"text": f"Line {i}: the launch moves to the fourteenth.", "speaker": "Maya"}
                 for i in range(12)]
        assert httpx.post(base + "/entries", headers={**h, "Idempotency-Key": "a"},
                          json={"entries": turns}).status_code == 200
        got = read_events(base + "/events?after=0", h, count=1, timeout=120)
        assert got.events, pool.logs()
        wait_until(lambda: httpx.get(base, headers=h).json()["offset"] is not None, 60,
                   "the worker to commit", pool.logs)
        answer = httpx.post(base + "/ask", headers=h, timeout=150,
                            json={"question": "When is the launch?", "timeout": 120})
        assert answer.status_code == 200, answer.text + pool.logs()
        assert answer.json()["kind"] == "answer"
        assert httpx.post(base + "/end", headers=h).status_code == 200
        assert httpx.get(base + "/notes", headers=h).status_code == 200
        assert httpx.get(f"{gateway.url}/v1/streams", headers=h).status_code == 200
        time.sleep(1.0)
        denied = admin.acl_log()
        assert denied == [], denied  # the gateway (and the worker) were refused nothing
        _assert_gateway_is_confined(redis.Redis.from_url(url), "acme-acl")
    finally:
        gateway.stop()
        pool.close()
        server.stop(hard=True)


def _assert_gateway_is_confined(client: redis.Redis, stream: str) -> None:
    keys = StreamKeys.of(stream)
    writes = [lambda: client.hset(keys.state, "version", "99"),
              lambda: client.xadd(keys.output, {"kind": "final", "text": "forged"}),
              lambda: client.set(keys.lease, "me"), lambda: client.incr(keys.fence),
              lambda: client.delete(keys.output), lambda: client.flushall(),
              lambda: client.keys("*"), lambda: client.config_get("*"),
              lambda: client.eval("return 1", 0), lambda: client.get("other-app:key")]
    for write in writes:
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()
    sha = client.script_load("return redis.call('HSET', KEYS[1], 'version', '99')")
    with pytest.raises(redis.exceptions.ResponseError, match="(?i)permission|NOPERM"):
        client.evalsha(sha, 1, keys.state)
