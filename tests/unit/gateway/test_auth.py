"""Tokens: stored as SHA-256 only, scopes and prefixes enforced, malformed files refused."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from sinkstream.gateway.auth import (
    Principal,
    TokenFileError,
    TokenStore,
    create_token,
    hash_token,
    parse_tokens,
    revoke_token,
)


def test_create_stores_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = create_token(path, "bot", ["publish"], ["acme-"])
    assert token.startswith("sst_") and len(token) > 40
    text = path.read_text()
    assert token not in text and token.split("_", 2)[2] not in text
    entry = json.loads(text)["tokens"][0]
    assert entry["sha256"] == hash_token(token)
    assert entry["scopes"] == ["publish"] and entry["prefixes"] == ["acme-"]
    assert path.stat().st_mode & 0o077 == 0, "readable by its owner only"
    store = TokenStore(path)
    who = store.lookup(token)
    assert who == Principal(entry["id"], "bot", frozenset({"publish"}), ("acme-",))
    assert store.lookup(token + "x") is None
    assert store.lookup(hash_token(token)) is None, "the stored hash is not a token"


def test_scopes_and_prefixes() -> None:
    who = Principal("id", "n", frozenset({"read"}), ("acme-", "beta."))
    assert who.may("read", "acme-standup") and who.may("read", "beta.x")
    assert not who.may("publish", "acme-standup")
    assert not who.may("read", "globex-standup") and not who.may("read", "xacme-1")
    assert Principal("id", "n", frozenset({"read"}), ("*",)).may("read", "anything")


@pytest.mark.parametrize("text,message", [
    ("{", "not JSON"),
    ('{"tokens": {}}', "expected"),
    ('{"tokens": [{"id": "a"}]}', "needs id, sha256"),
    ('{"tokens": [{"id": "a", "sha256": "00", "scopes": [], "prefixes": ["*"]}]}', "64 hex"),
    ('{"tokens": [{"id": "a", "sha256": "' + "0" * 64 + '", "scopes": ["admin"], '
     '"prefixes": ["*"]}]}', "unknown scopes"),
    ('{"tokens": [{"id": "a", "sha256": "' + "0" * 64 + '", "scopes": ["read"], '
     '"prefixes": []}]}', "no prefixes"),
])
def test_malformed_files_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(TokenFileError, match=message):
        parse_tokens(text)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="tokens file"):
        TokenStore(tmp_path / "nope.json")


def test_changes_are_picked_up_and_a_broken_edit_keeps_the_last_good_tokens(
        tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first = create_token(path, "a", ["read"], ["*"])
    store = TokenStore(path)
    second = create_token(path, "b", ["read"], ["*"])
    os.utime(path, (time.time() + 5, time.time() + 5))
    store._checked = 0.0
    assert store.lookup(second) is not None
    assert revoke_token(path, first.split("_")[1])
    os.utime(path, (time.time() + 10, time.time() + 10))
    store._checked = 0.0
    assert store.lookup(first) is None
    path.write_text("{ broken")
    os.utime(path, (time.time() + 15, time.time() + 15))
    store._checked = 0.0
    assert store.lookup(second) is not None
