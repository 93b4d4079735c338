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
it reads, so nothing read from Redis may go through it. :meth:`Miner.encode` writes what Drain
knows instead (its parameters' fingerprint, the cluster counter, every cluster's id, template
tokens and size, and the prefix tree with each node's cluster ids in order) and
:meth:`Miner.decode` rebuilds the same ``Drain`` from it, checking every value's type. The tree
is stored, not rebuilt from the templates, because Drain never moves a cluster once placed
(templates generalise in place): a rebuilt tree could route a later line elsewhere, and a
replay after a crash must mine exactly as the lost attempt did.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import msgpack
from drain3.drain import Drain, LogCluster, Node

from workers.logs.masking import Masking

FORMAT_VERSION = 1
#: a token that names a state or event type: upper case letters, digits and underscores
_ENUM = re.compile(r"^[A-Z][A-Z0-9_]*[A-Z0-9]$")
#: a plain word, optionally capitalised and followed by punctuation
_WORD = re.compile(r"^[A-Za-z][a-z]+[.,:;]?$")

Change = Literal["created", "changed", "none"]
#: where lines go once a stream holds ``max_templates`` templates and a line matches none
OTHER_ID = 0
OTHER_TEMPLATE = "<other>"


class MinerStateError(ValueError):
    """A stored miner that cannot be used: corrupt, another format, other parameters."""


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
    """One stream's template miner: masks and mines messages, encodes and decodes itself."""

    def __init__(self, config: MiningConfig | None = None) -> None:
        self.config = config or MiningConfig()
        self.drain = _Drain(depth=self.config.depth, sim_th=self.config.sim_th,
                            max_children=self.config.max_children)
        self.drain.word_penalty = self.config.word_penalty
        self.masker = self.config.masking.masker()

    def add(self, message: str) -> Mined:
        """Mine one message (masked first); deterministic given the miner's state."""
        masked = self.masker.mask(message)
        if len(self.drain.id_to_cluster) >= self.config.max_templates and \
                self.drain.tree_search(self.drain.root_node,
                                       self.drain.get_content_as_tokens(masked),
                                       self.drain.sim_th, False) is None:
            return Mined(OTHER_ID, OTHER_TEMPLATE, "none")
        cluster, change = self.drain.add_log_message(masked)
        kind: Change = "created" if change == "cluster_created" else \
            "changed" if change == "cluster_template_changed" else "none"
        return Mined(cluster.cluster_id, cluster.get_template(), kind)

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

    # ----- state -------------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The miner as msgpack: fingerprint, counter, clusters, tree (see module doc)."""
        clusters = [[c.cluster_id, list(c.log_template_tokens), c.size]
                    for c in self.drain.id_to_cluster.values()]
        return msgpack.packb({"v": FORMAT_VERSION, "fp": self.config.fingerprint,
                              "n": self.drain.clusters_counter, "c": clusters,
                              "t": _tree(self.drain.root_node)}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, config: MiningConfig | None = None) -> Miner:
        """Rebuild a miner from :meth:`encode`'s bytes; MinerStateError if they are not a
        miner of this format and these parameters."""
        miner = cls(config)
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=0,
                                  max_ext_len=0)
        except (ValueError, msgpack.UnpackException) as exc:
            raise MinerStateError(f"miner state is not msgpack ({exc})") from None
        if not isinstance(raw, dict) or raw.get("v") != FORMAT_VERSION:
            raise MinerStateError("miner state has another format version")
        if raw.get("fp") != miner.config.fingerprint:
            raise MinerStateError(f"miner state was mined as {raw.get('fp')!r}, this worker "
                                  f"mines as {miner.config.fingerprint!r}")
        try:
            miner.drain.clusters_counter = _int(raw["n"])
            for cid, tokens, size in raw["c"]:
                cluster = LogCluster([_str(t) for t in tokens], _int(cid))
                cluster.size = _int(size)
                miner.drain.id_to_cluster[cluster.cluster_id] = cluster
            miner.drain.root_node = _node(raw["t"], miner.config.depth + 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise MinerStateError(f"miner state is malformed ({exc})") from None
        return miner


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
