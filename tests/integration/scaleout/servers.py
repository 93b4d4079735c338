"""Launchers the scale-out tests need besides ``sinkstream.cli.localredis``: a Sentinel group, and
worker "hosts" in network namespaces. Everything listens on loopback or on a private /24 the
test creates, and everything is torn down by the caller (``stop()`` / context managers)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from sinkstream.cli.localredis import RedisServer, free_port, redis_server_binary
from tests.integration.pipeline.harness import ROOT, Worker


# ----- Sentinel ----------------------------------------------------------------------------
@dataclass
class ReplicatedGroup:
    """One Sentinel-monitored group: a primary and its replicas."""

    name: str
    primary: RedisServer
    replicas: list[RedisServer]

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]


class SentinelGroup:
    """Sentinels (quorum 2) monitoring one or more groups, each a primary with ``replicas``
    replicas, all on free loopback ports. ``groups`` maps a master name to its
    ``min-replicas-to-write`` (0 = Redis's default: a primary that lost its replicas keeps
    accepting writes, which a failover then discards)."""

    def __init__(self, workdir: Path, groups: dict[str, int] | None = None, replicas: int = 1,
                 sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.down_after_ms = down_after_ms
        self.groups: dict[str, ReplicatedGroup] = {}
        for name, min_replicas in (groups or {"mymaster": 0}).items():
            common: tuple[str, ...] = ("--repl-diskless-sync-delay", "0")
            if min_replicas:
                # a primary that lost its replicas (the old one, while Sentinel promotes
                # another) refuses writes instead of accepting writes the failover discards
                common += ("--min-replicas-to-write", str(min_replicas),
                           "--min-replicas-max-lag", "2")
            primary = RedisServer(workdir / f"{name}-primary", extra_args=common)
            self.groups[name] = ReplicatedGroup(name, primary, [
                RedisServer(workdir / f"{name}-replica{i}", extra_args=(
                    *common, "--replicaof", "127.0.0.1", str(primary.port)))
                for i in range(replicas)
            ])
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    def url(self, name: str, db: int = 0) -> str:
        """``redis+sentinel://`` data URL for the group ``name``."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{name}/{db}"

    def broker_url(self, db: int = 0) -> str:
        """kombu's ``sentinel://`` URL (one per Sentinel, ``;``-joined); the master name goes
        in the transport options (``broker_sentinel_master``)."""
        return ";".join(f"sentinel://127.0.0.1:{p}/{db}" for p in self.sentinel_ports)

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[i], socket_timeout=5,
                           decode_responses=True)

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        for group in self.groups.values():
            for server in group.servers:
                server.start()
        for i, port in enumerate(self.sentinel_ports):
            d = self.workdir / f"sentinel{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            lines = [f"port {port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no",
                     f"dir {d}", f"logfile {d / 'sentinel.log'}", "sentinel announce-ip 127.0.0.1"]
            for name, group in self.groups.items():
                lines += [
                    f"sentinel monitor {name} 127.0.0.1 {group.primary.port} 2",
                    f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                    f"sentinel failover-timeout {name} 10000",
                    f"sentinel parallel-syncs {name} 1",
                ]
            conf.write_text("\n".join(lines) + "\n")
            self.sentinel_procs.append(subprocess.Popen(
                [redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ready(name) for name in self.groups):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"sentinel group not ready after {timeout}s")

    def _ready(self, name: str) -> bool:
        group = self.groups[name]
        try:
            for i in range(len(self.sentinel_ports)):
                s = self.sentinel(i)
                if len(s.sentinel_slaves(name)) < len(group.replicas):
                    return False
                if len(s.sentinel_sentinels(name)) < len(self.sentinel_ports) - 1:
                    return False
            info = group.primary.client().info("replication")
            links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            return len(links) == len(group.replicas) and all(
                link.get("state") == "online" for link in links)
        except redis.RedisError:
            return False

    def master_port(self, name: str, i: int = 0) -> int:
        _, port = self.sentinel(i).sentinel_get_master_addr_by_name(name)
        return int(port)

    def server(self, name: str, port: int) -> RedisServer:
        return next(s for s in self.groups[name].servers if s.port == port)

    def failover(self, name: str) -> None:
        """``SENTINEL FAILOVER``: promote a replica without the others' agreement."""
        self.sentinel(0).execute_command("SENTINEL", "FAILOVER", name)

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.sentinel_procs.clear()
        for group in self.groups.values():
            for server in group.servers:
                server.stop(hard=True)


# ----- network namespaces --------------------------------------------------------------------
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


def netns_unavailable() -> str | None:
    """Why worker hosts in network namespaces cannot be made here, or None if they can."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"ssprobe{secrets.token_hex(3)}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"`ip netns add` failed: {probe.stderr.strip()}"
    try:
        veth = _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b",
                   check=False)
        if veth.returncode != 0:
            return f"`ip link add ... type veth` failed: {veth.stderr.strip()}"
        _ip("link", "del", f"{name}a", check=False)
    finally:
        _ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    """A worker host: a network namespace joined to the test bridge by a veth pair."""

    netns: str
    host_link: str  # the veth end on the host side (in the bridge): down = host cut off
    address: str


@dataclass
class WorkerNetwork:
    """A bridge with ``gateway`` (where Redis listens) and hosts in a private /24."""

    bridge: str
    gateway: str
    hosts: list[Host] = field(default_factory=list)

    def cut(self, host: Host) -> None:
        _ip("link", "set", host.host_link, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.host_link, "up")

    def start_worker(self, host: Host, env: dict[str, str], log: Path, name: str) -> Worker:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-m", "sinkstream", "worker",
             "--name", f"{name}@test"],
            env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return Worker(proc, log)


@contextlib.contextmanager
def worker_network(n_hosts: int) -> Iterator[WorkerNetwork]:
    """Create a bridge and ``n_hosts`` namespaces in 10.213.<random>.0/24; always remove them."""
    tag = secrets.token_hex(2)
    subnet = f"10.213.{int(tag, 16) % 250 + 1}"
    net = WorkerNetwork(bridge=f"ssbr{tag}", gateway=f"{subnet}.1")
    made_ns: list[str] = []
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(n_hosts):
            ns = f"sshost{tag}{i}"
            host_link, ns_link = f"ssv{tag}h{i}", f"ssv{tag}n{i}"
            _ip("netns", "add", ns)
            made_ns.append(ns)
            _ip("link", "add", host_link, "type", "veth", "peer", "name", ns_link)
            _ip("link", "set", ns_link, "netns", ns)
            _ip("link", "set", host_link, "master", net.bridge)
            _ip("link", "set", host_link, "up")
            address = f"{subnet}.{10 + i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", ns_link)
            _ip("-n", ns, "link", "set", ns_link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            net.hosts.append(Host(ns, host_link, address))
        yield net
    finally:
        for host in net.hosts:
            _ip("link", "del", host.host_link, check=False)  # deletes its peer too
        for ns in made_ns:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", net.bridge, check=False)


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.05) -> float:
    """Wait until ``predicate()`` is truthy; return the time.time() it became so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.time()
        except redis.RedisError:
            pass
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
