"""Many worker hosts: three workers, each in its own network namespace joined by a veth pair
to a bridge in a private /24 that the test creates; Redis (data and broker) listens on the
bridge address. Mid-run one host is cut off (``ip link set <veth> down``): its leases expire,
its streams move to the other hosts, nothing is lost and every final state equals feeding the
engine directly. Namespaces, veths and the bridge are always removed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseManager
from tests.integration.pipeline.harness import (
    Worker,
    caught_up,
    meta,
    settings_from_env,
    wait_until,
    worker_env,
)
from tests.integration.scaleout.common import (
    assert_states_match_reference,
    qmsum_turns,
    report,
    version,
)
from tests.integration.scaleout.servers import netns_unavailable, wait_for, worker_network


def test_a_host_cut_off_mid_run_hands_its_streams_to_the_others(
    tmp_path: Path, qmsum_dir: Path
) -> None:
    why = netns_unavailable()
    if why:
        pytest.skip(f"cannot put workers in network namespaces here: {why}")
    streams = [f"room-{i}" for i in range(6)]
    turns = qmsum_turns(qmsum_dir, 36)
    with worker_network(3) as net:
        server = RedisServer(tmp_path / "redis", extra_args=(
            "--bind", "127.0.0.1", net.gateway, "--protected-mode", "no"))
        server.start()
        workers: dict[str, Worker] = {}
        try:
            client = server.client()
            url = f"redis://{net.gateway}:{server.port}/0"
            # one stream per task: the hand-over under test needs streams spread over the
            # hosts; with cross-stream batching the first host ready, alone among the live
            # workers until the others' first heartbeats, takes every stream of this small
            # backlog as its companions and finishes it in its first time slice
            env = worker_env(url, tmp_path, SINKSTREAM_BATCH_STREAMS="1")
            settings = settings_from_env(env)
            producer = Producer(client, settings=settings)
            for sid in streams:
                producer.publish_many(sid, turns[:24])
            for i, host in enumerate(net.hosts):
                workers[host.netns] = net.start_worker(
                    host, env, tmp_path / f"worker-{i}.log", f"host{i}")

            def logs() -> str:
                return "\n".join(f"--- {ns}\n{w.tail()}" for ns, w in workers.items())

            leases = LeaseManager(client)
            by_pid = {str(w.proc.pid): ns for ns, w in workers.items()}

            def holders() -> dict[str, str]:
                out = {}
                for sid in streams:
                    held = leases.holder(sid)
                    if held:
                        out[sid] = by_pid.get(held.split("|")[0].rsplit("-", 1)[-1], "?")
                return out

            wait_until(lambda: len({meta(client, s).get("worker") for s in streams
                                    if version(client, s) > 0}) >= 2, 180,
                       "at least two hosts to commit", logs)
            held: dict[str, str] = {}
            wait_until(lambda: bool(held.update(holders()) or held), 60, "a held lease", logs)
            victim_ns = max(set(held.values()), key=list(held.values()).count)
            victim = next(h for h in net.hosts if h.netns == victim_ns)
            owned = sorted(s for s, ns in held.items() if ns == victim_ns)
            versions = {s: version(client, s) for s in owned}
            cut = time.time()
            net.cut(victim)
            for sid in streams:  # more input while the host is away
                producer.publish_many(sid, turns[24:])
            moved = wait_for(
                lambda: all(version(client, s) > versions[s] for s in owned), 120,
                "the cut-off host's streams to be committed by another host")
            wait_until(lambda: all(caught_up(client, s) for s in streams), 240,
                       "the other hosts to finish every stream", logs)
            done = time.time()
            victim_pid = str(workers[victim_ns].proc.pid)
            after = {s: meta(client, s).get("worker", "") for s in owned}
            net.restore(victim)  # the stale host comes back: its late commit must be refused
            time.sleep(3)
            refused = sum(int(meta(client, s).get("commits_refused", 0)) for s in streams)
            for worker in workers.values():
                worker.kill()
            report(tmp_path, "host-cut", {
                "fault": f"ip link set {victim.host_link} down (host {victim.address}, "
                         f"worker pid {victim_pid})",
                "streams_leased_by_that_host": owned,
                "moved_after_s": round(moved - cut, 3),
                "all_streams_caught_up_after_s": round(done - cut, 3),
                "committed_by_after_move": after,
                "late_commits_refused_after_reconnect": refused,
                "input_entries": {s: client.xlen(StreamKeys.of(s).input) for s in streams},
            })
            assert all(not w.endswith(f"-{victim_pid}") for w in after.values()), after
            assert all(client.xlen(StreamKeys.of(s).input) == len(turns) for s in streams)
            assert_states_match_reference(client, settings, streams)
        finally:
            for worker in workers.values():
                worker.kill()
            server.stop(hard=True)
