"""The logs hash as the first format stored it (one ``miner`` and one ``table`` blob), written
from live objects: what a stream mined before the per-template fields looks like in Redis."""

from __future__ import annotations

from typing import Any

import msgpack
from drain3.drain import Node

from workers.logs.mining import Miner
from workers.logs.table import Table


def _tree(node: Node) -> list[Any]:
    return [list(node.cluster_ids),
            {key: _tree(child) for key, child in node.key_to_child_node.items()}]


def miner_blob(miner: Miner) -> bytes:
    """Fingerprint, counter, every cluster, the whole tree."""
    clusters = [[c.cluster_id, list(c.log_template_tokens), c.size]
                for c in miner.drain.id_to_cluster.values()]
    return msgpack.packb({"v": 1, "fp": miner.config.fingerprint,
                          "n": miner.drain.clusters_counter, "c": clusters,
                          "t": _tree(miner.drain.root_node)})


def table_blob(table: Table) -> bytes:
    """Every template's row (its id first), the incidents and the counts."""
    templates = [[s.template_id, s.template, s.count, s.levels, s.first_ts, s.last_ts,
                  s.first_entry, s.last_entry, s.example,
                  [[b, *cell] for b, cell in sorted(s.buckets.items())], s.first_line]
                 for s in table.templates.values()]
    incidents = [[i.template_id, i.start_bucket, i.end_bucket, i.count, i.first_ts,
                  i.last_ts, i.baseline] for i in table.incidents]
    return msgpack.packb({"v": 1, "t": templates, "i": incidents, "n": table.lines,
                          "l": table.levels, "c": table.notes_cursor,
                          "b": [table.first_bucket, table.last_bucket]})
