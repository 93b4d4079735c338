"""Template mining with Drain3, and the miner's state as plain msgpack (never pickle).

The miner is Drain3's ``Drain`` (the prefix tree of templates) behind our masking
(``workers.logs.masking``), with two changes to how a line is compared with a template, both
about tokens that masking leaves as words:

* two different ALL-CAPS tokens (``NEW`` / ``RUNNING``, ``JOB_SETUP``) never match: they are
  states, event types and enum values, i.e. what tells events apart;
* two different lower-case words count against the similarity twice (``word_penalty``): a
  word that changes is more often another event (``stored as bytes`` / ``as values``) than a
  variable, while variables are mostly masked already.

With ``sim_th`` 0.6 and depth 5 this groups the eight LogHub systems at least as well as
Drain3's defaults on every one of them and better on five (mean 0.954 vs 0.901,
``benchmarks/logs.py``); one configuration for all.

Bound: a stream holds at most ``max_templates`` templates. Past that, a line that matches none
is counted under template 0, ``<other>``, instead of creating one: a stream of random text
cannot grow its miner (and the state every batch re-encodes) without limit.

Persistence: Drain3's own snapshots are jsonpickle, which rebuilds arbitrary objects from what
it reads, so nothing read from Redis may go through it. The miner is stored as plain msgpack
in fields of the stream's logs hash, so that a batch writes only what it changed
(:meth:`Miner.take_changes`), not the whole miner (~0.5 MB and tens of ms per batch at 5,000
templates):

* ``miner:head``: format version, the parameters' fingerprint, the cluster counter;
* ``miner:c:<id>``: one cluster's template tokens and size (a batch rewrites the clusters its
  lines matched);
* ``miner:tree:<n>``: the root's child for templates of ``n`` tokens (its cluster ids and
  its children's keys, in order), and ``miner:tree:<n>:<token>`` the subtree under each of
  those children, each node with its cluster ids in order (a batch rewrites only the
  subtrees it created templates in: at a few thousand templates, the whole tree is ~10 ms
  to encode).

:meth:`Miner.from_fields` rebuilds the same ``Drain`` from them, checking every value's type.
The tree is stored, not rebuilt from the templates, because Drain never moves a cluster once
placed (templates generalise in place): a rebuilt tree could route a later line elsewhere, and
a replay after a crash must mine exactly as the lost attempt did. The first format, one
``miner`` blob, is still read (:meth:`Miner.decode`); the next commit writes the fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import msgpack
from drain3.drain import Drain, LogCluster, Node

from sinkstream.contracts.formats import NewerFormatError, is_newer
from workers.logs.masking import Masking

#: the format of ``miner:head`` and the fields beside it; 1 was the single ``miner`` blob
FORMAT_VERSION = 2
LEGACY_VERSION = 1
HEAD_FIELD = "miner:head"
CLUSTER_PREFIX = "miner:c:"
TREE_PREFIX = "miner:tree:"
#: a token that names a state or event type: upper case letters, digits and underscores
_ENUM = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")
#: a plain word, optionally capitalised and followed by punctuation
_WORD = re.compile(r"^[A-Za-z][a-z]+[.,:;]?$")

Change = Literal["created", "changed", "none"]
#: where lines go once a stream holds ``max_templates`` templates and a line matches none
OTHER_ID = 0
OTHER_TEMPLATE = "<other>"
#: masked messages a miner remembers the template of (see ``Miner.add``)
MATCH_MEMORY = 1 << 13


class MinerStateError(ValueError):
    """A stored miner that cannot be used: corrupt, another format, other parameters."""


class MinerTooNewError(MinerStateError, NewerFormatError):
    """A miner stored by a newer build (its head's format version is past ours)."""

    def __init__(self, version: int) -> None:
        super().__init__(self._newer("log miner", version, FORMAT_VERSION))


@dataclass(frozen=True)
class MiningConfig:
    """Drain's parameters. ``fingerprint`` names all of them (and the masking): a stored miner
    is only continued under the same fingerprint."""

    sim_th: float = 0.6
    depth: int = 5
    max_children: int = 100
    word_penalty: float = 1.0
    max_templates: int = 5000
    masking: Masking = field(default_factory=Masking)

    @property
    def fingerprint(self) -> str:
        return (f"drain3-0.9;sim={self.sim_th};depth={self.depth};children={self.max_children};"
                f"word={self.word_penalty};max={self.max_templates};masks={self.masking.name}")


class Mined(NamedTuple):
    """Where one message went: its template's id and text, and whether the template is new
    (``created``), was generalised by it (``changed``) or already matched (``none``). (A named
    tuple: one is made per line, and a frozen dataclass costs several times as much.)"""

    template_id: int
    template: str
    change: Change


class _Drain(Drain):
    """Drain with the comparison described in the module docstring."""

    word_penalty = 1.0

    def get_seq_distance(self, seq1: Sequence[str], seq2: Sequence[str],
                         include_params: bool) -> tuple[float, int]:
        if not seq1:
            return 1.0, 0
        if tuple(seq2) == seq1:  # ~3 in 4 calls on LogHub: the loop below would count
            params = seq1.count(self.param_str)  # every token equal, params as params
            return float(len(seq1) if include_params else len(seq1) - params) / len(seq1), \
                params
        same = 0.0
        params = 0
        for token1, token2 in zip(seq1, seq2, strict=True):
            if token1 == self.param_str:
                params += 1
            elif token1 == token2:
                same += 1
            elif _ENUM.match(token1) and _ENUM.match(token2):
                return 0.0, 0
            elif _WORD.match(token1) and _WORD.match(token2):
                same -= self.word_penalty
        if include_params:
            same += params
        return same / len(seq1), params

    def create_template(self, seq1: Sequence[str], seq2: Sequence[str]) -> list[str]:
        """Drain's merge of a line (``seq1``) into a template (``seq2``); a line equal to the
        template (most lines, as above) leaves it as it is without the token loop."""
        if tuple(seq1) == seq2:
            return list(seq2)
        return super().create_template(seq1, seq2)


class Miner:
    """One stream's template miner: masks and mines messages; its state as hash fields."""

    def __init__(self, config: MiningConfig | None = None,
                 match_memory: int = MATCH_MEMORY) -> None:
        self.config = config or MiningConfig()
        self.drain = _Drain(depth=self.config.depth, sim_th=self.config.sim_th,
                            max_children=self.config.max_children)
        self.drain.word_penalty = self.config.word_penalty
        self.masker = self.config.masking.masker()
        #: clusters and tree lengths changed since ``take_changes`` (what the next commit
        #: writes beside the head)
        self._changed_clusters: set[int] = set()
        #: (token count, first key or None for the token count's own node)
        self._changed_nodes: set[tuple[str, str | None]] = set()
        #: masked message -> (its cluster, its template), for messages that matched a
        #: template and left it as it was, since the last template was created or changed
        self._matched: dict[str, tuple[LogCluster, str]] = {}
        self._match_memory = match_memory  # 0: Drain's tree search for every message

    def add(self, message: str) -> Mined:
        """Mine one message (masked first); deterministic given the miner's state.

        Drain's answer for a message is a function of its tokens, the prefix tree and the
        templates; cluster sizes play no part. While no template is created or changed, the
        tree and the templates stand still, so a masked message seen since then (~9 in 10
        lines of the LogHub samples) goes to the same cluster, again unchanged: ``_matched``
        gives it without the tree search (~2 us of ~7 per line). Any creation or change
        forgets them all, so the result is Drain's, bit for bit; nothing of it is stored.
        """
        masked = self.masker.mask(message)
        known = self._matched.get(masked)
        if known is not None:
            cluster, template = known
            cluster.size += 1
            self._changed_clusters.add(cluster.cluster_id)
            return Mined(cluster.cluster_id, template, "none")
        if len(self.drain.id_to_cluster) >= self.config.max_templates and \
                self.drain.tree_search(self.drain.root_node,
                                       self.drain.get_content_as_tokens(masked),
                                       self.drain.sim_th, False) is None:
            return Mined(OTHER_ID, OTHER_TEMPLATE, "none")
        cluster, change = self.drain.add_log_message(masked)
        self._changed_clusters.add(cluster.cluster_id)  # its size, at least
        template = cluster.get_template()
        if change == "none":
            if self._match_memory:
                if len(self._matched) >= self._match_memory:
                    self._matched.clear()
                self._matched[masked] = (cluster, template)
            return Mined(cluster.cluster_id, template, "none")
        self._matched.clear()
        if change == "cluster_created":
            self._placed(cluster.log_template_tokens)
            return Mined(cluster.cluster_id, template, "created")
        return Mined(cluster.cluster_id, template, "changed")

    def template(self, template_id: int) -> str | None:
        cluster = self.drain.id_to_cluster.get(template_id)
        return cluster.get_template() if cluster is not None else None

    def match(self, message: str) -> int | None:
        """The template a message matches exactly, without learning from it (read only)."""
        cluster = self.drain.match(self.masker.mask(message), "fallback")
        return cluster.cluster_id if cluster is not None else None

    @property
    def templates(self) -> dict[int, str]:
        return {cid: c.get_template() for cid, c in self.drain.id_to_cluster.items()}

    def _placed(self, tokens: Sequence[str]) -> None:
        """Note the tree nodes a new template of ``tokens`` was placed under. Below the
        token count's node, Drain follows the first token when that node has (or just made)
        a child for it, else the wildcard child: so the subtree is found without walking."""
        length = str(len(tokens))
        self._changed_nodes.add((length, None))
        if len(tokens) >= 2:
            children = self.drain.root_node.key_to_child_node[length].key_to_child_node
            first = tokens[0] if tokens[0] in children else self.drain.param_str
            self._changed_nodes.add((length, first))

    # ----- state -------------------------------------------------------------------------------
    def head(self) -> bytes:
        """``miner:head``: format, fingerprint, cluster counter."""
        return msgpack.packb({"v": FORMAT_VERSION, "fp": self.config.fingerprint,
                              "n": self.drain.clusters_counter}, use_bin_type=True)

    def take_changes(self) -> dict[str, bytes]:
        """The hash fields changed since the last call (the head always), and forget them:
        what a batch's commit writes. Deterministic: the same lines from the same committed
        fields give the same fields."""
        drain = self.drain
        fields = {HEAD_FIELD: self.head()}
        for cid in sorted(self._changed_clusters):
            cluster = drain.id_to_cluster[cid]
            fields[f"{CLUSTER_PREFIX}{cid}"] = msgpack.packb(
                [list(cluster.log_template_tokens), cluster.size], use_bin_type=True)
        for length, key in sorted(self._changed_nodes, key=lambda n: (n[0], n[1] or "")):
            node = drain.root_node.key_to_child_node[length]
            if key is None:
                value = [list(node.cluster_ids), list(node.key_to_child_node)]
                fields[f"{TREE_PREFIX}{length}"] = msgpack.packb(value, use_bin_type=True)
            else:
                fields[f"{TREE_PREFIX}{length}:{key}"] = msgpack.packb(
                    _tree(node.key_to_child_node[key]), use_bin_type=True)
        self._changed_clusters.clear()
        self._changed_nodes.clear()
        return fields

    def _all_changed(self) -> None:
        """Every field to be written by the next commit (a miner read from the old format)."""
        self._changed_clusters.update(self.drain.id_to_cluster)
        for length, node in self.drain.root_node.key_to_child_node.items():
            self._changed_nodes.add((length, None))
            self._changed_nodes.update((length, key) for key in node.key_to_child_node)

    @classmethod
    def from_fields(cls, fields: Mapping[str, bytes],
                    config: MiningConfig | None = None) -> Miner:
        """Rebuild a miner from its hash fields (other fields of the hash are ignored);
        MinerStateError if they are not a miner of this format and these parameters."""
        miner = cls(config)
        head = fields.get(HEAD_FIELD)
        if head is None:
            raise MinerStateError(f"miner state has no {HEAD_FIELD!r}")
        raw = _unpack(head)
        if isinstance(raw, dict) and is_newer(raw.get("v"), FORMAT_VERSION):
            raise MinerTooNewError(raw["v"])
        if not isinstance(raw, dict) or raw.get("v") != FORMAT_VERSION:
            raise MinerStateError("miner state has another format version")
        miner._check_fingerprint(raw)
        drain = miner.drain
        try:
            drain.clusters_counter = _int(raw["n"])
            clusters, tree = [], {}
            for name, value in fields.items():
                if name.startswith(CLUSTER_PREFIX):
                    clusters.append((int(name[len(CLUSTER_PREFIX):]), value))
                elif name.startswith(TREE_PREFIX):
                    tree[name[len(TREE_PREFIX):]] = value
            for cid, value in sorted(clusters):  # created in id order, as they were
                tokens, size = _unpack(value)
                miner._add_cluster(cid, tokens, size)
            miner._read_tree(tree)
        except (KeyError, TypeError, ValueError) as exc:
            raise MinerStateError(f"miner state is malformed ({exc})") from None
        return miner

    @classmethod
    def decode(cls, data: bytes, config: MiningConfig | None = None) -> Miner:
        """A miner of the first format (one ``miner`` blob: fingerprint, counter, clusters,
        tree), read so that streams mined before the fields keep their templates; its next
        commit writes every field."""
        miner = cls(config)
        raw = _unpack(data)
        if not isinstance(raw, dict) or raw.get("v") != LEGACY_VERSION:
            raise MinerStateError("miner state has another format version")
        miner._check_fingerprint(raw)
        try:
            miner.drain.clusters_counter = _int(raw["n"])
            for cid, tokens, size in raw["c"]:
                miner._add_cluster(_int(cid), tokens, size)
            miner.drain.root_node = _node(raw["t"], miner.config.depth + 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise MinerStateError(f"miner state is malformed ({exc})") from None
        miner._all_changed()
        return miner

    def _read_tree(self, tree: dict[str, bytes]) -> None:
        """The root's children from ``miner:tree:<n>`` and their subtrees from
        ``miner:tree:<n>:<token>`` (keys here without the prefix)."""
        root = self.drain.root_node
        for length in sorted((k for k in tree if ":" not in k), key=int):
            ids, keys = _unpack(tree[length])
            if not isinstance(keys, list):
                raise ValueError("bad tree node")
            node = Node()
            node.cluster_ids = [_int(i) for i in ids]
            node.key_to_child_node = {
                _str(key): _node(_unpack(tree[f"{length}:{key}"]), self.config.depth - 1)
                for key in keys}
            root.key_to_child_node[str(int(length))] = node

    def _check_fingerprint(self, raw: dict[Any, Any]) -> None:
        if raw.get("fp") != self.config.fingerprint:
            raise MinerStateError(f"miner state was mined as {raw.get('fp')!r}, this worker "
                                  f"mines as {self.config.fingerprint!r}")

    def _add_cluster(self, cid: int, tokens: Any, size: Any) -> None:
        if not isinstance(tokens, list):
            raise ValueError("cluster tokens are not a list")
        cluster = LogCluster([_str(t) for t in tokens], _int(cid))
        cluster.size = _int(size)
        self.drain.id_to_cluster[cluster.cluster_id] = cluster


def _unpack(data: bytes) -> Any:
    """msgpack from Redis: no ext types, no binary (a miner holds none), map keys as read."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=0,
                               max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MinerStateError(f"miner state is not msgpack ({exc})") from None


def _tree(node: Node) -> list[Any]:
    return [list(node.cluster_ids),
            {key: _tree(child) for key, child in node.key_to_child_node.items()}]


def _node(raw: Any, depth_left: int) -> Node:
    """A tree node from its encoding; the depth is bounded so a hostile blob cannot recurse."""
    if depth_left < 0 or not isinstance(raw, list) or len(raw) != 2:
        raise ValueError("bad tree node")
    ids, children = raw
    if not isinstance(ids, list) or not isinstance(children, dict):
        raise ValueError("bad tree node")
    node = Node()
    node.cluster_ids = [_int(i) for i in ids]
    node.key_to_child_node = {_str(k): _node(v, depth_left - 1) for k, v in children.items()}
    return node


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an int, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a str, got {type(value).__name__}")
    return value
