"""Bearer tokens with scopes, limited to stream-id prefixes (tenants), stored hashed.

Why it is built this way:

* **Nothing secret at rest.** The tokens file holds the SHA-256 of each token, its scopes and
  its stream-id prefixes, never the token: a leaked config or backup grants nothing.
  ``sinkstream token create`` prints a new token once. A plain SHA-256 is enough because
  tokens are 256-bit random strings, not passwords: there is no dictionary to try, so a slow
  password hash would only slow every request down.
* **Closed by default.** No token, or an unknown one: 401. A known token outside its scopes
  (``publish``, ``read``, ``ask``) or its prefixes: 403. A token whose prefixes are
  ``["acme-"]`` never reads, writes or lists a stream that does not start with ``acme-``.
  ``"*"`` as a prefix means every stream (an operator's token).
* **Edited without a restart.** The file is re-read when its modification time changes
  (checked at most once a second), so a new or revoked token takes effect at once.

The tokens file (JSON)::

    {"version": 1, "tokens": [{"id": "3f9a1c2b", "name": "captions-bot",
      "sha256": "<hex>", "scopes": ["publish"], "prefixes": ["acme-"], "created": 1.7e9}]}
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCOPES = ("publish", "read", "ask")
ALL_STREAMS = "*"
TOKEN_PREFIX = "sst_"
_RELOAD_CHECK_S = 1.0


class TokenFileError(ValueError):
    """The tokens file is missing, unreadable or malformed (the message says which)."""


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a valid token belongs to and what it may do."""

    token_id: str
    name: str
    scopes: frozenset[str]
    prefixes: tuple[str, ...]

    def covers(self, stream_id: str) -> bool:
        """Whether ``stream_id`` belongs to one of this token's tenants (prefixes)."""
        return any(p == ALL_STREAMS or stream_id.startswith(p) for p in self.prefixes)

    def may(self, scope: str, stream_id: str | None = None) -> bool:
        """Whether this token has ``scope`` (on ``stream_id``, when one is named)."""
        return scope in self.scopes and (stream_id is None or self.covers(stream_id))


def _principal(raw: dict[str, Any], where: str) -> tuple[str, Principal]:
    try:
        digest = str(raw["sha256"]).lower()
        scopes = frozenset(str(s) for s in raw["scopes"])
        prefixes = tuple(str(p) for p in raw["prefixes"])
        token_id, name = str(raw["id"]), str(raw.get("name", ""))
    except (KeyError, TypeError) as exc:
        raise TokenFileError(f"{where}: needs id, sha256, scopes and prefixes ({exc})") from None
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise TokenFileError(f"{where}: sha256 must be 64 hex digits")
    if unknown := scopes - set(SCOPES):
        raise TokenFileError(f"{where}: unknown scopes {sorted(unknown)} (use {SCOPES})")
    if not prefixes:
        raise TokenFileError(f"{where}: no prefixes: list stream-id prefixes, or '*' for all")
    return digest, Principal(token_id, name, scopes, prefixes)


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, Principal]:
    """``{sha256: Principal}`` from a tokens file's text; TokenFileError if malformed."""
    try:
        data = json.loads(text) if text.strip() else {"tokens": []}
    except ValueError as exc:
        raise TokenFileError(f"{source}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise TokenFileError(f'{source}: expected {{"tokens": [...]}}')
    out: dict[str, Principal] = {}
    for i, raw in enumerate(data["tokens"]):
        if not isinstance(raw, dict):
            raise TokenFileError(f"{source}: token {i} is not an object")
        digest, principal = _principal(raw, f"{source}: token {i}")
        out[digest] = principal
    return out


class TokenStore:
    """The tokens of one file, re-read when it changes; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mtime = -1.0
        self._checked = 0.0
        self._tokens: dict[str, Principal] = {}
        self._load()  # fail at start, with the reason, rather than 401 for everyone

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except OSError as exc:
            raise TokenFileError(f"tokens file {self.path}: {exc.strerror or exc}") from None
        self._tokens = parse_tokens(text, str(self.path))
        self._mtime = mtime

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < _RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            if self.path.stat().st_mtime != self._mtime:
                self._load()
        except (OSError, TokenFileError):
            pass  # keep serving the last good tokens; the next change is read again

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, or None for an unknown one."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        with self._lock:
            self._maybe_reload()
            return self._tokens.get(hash_token(token))

    def __len__(self) -> int:
        return len(self._tokens)


def new_token() -> tuple[str, str]:
    """``(token id, token)``: the id names it in the file and in logs; the rest is secret."""
    token_id = secrets.token_hex(4)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def create_token(path: Path, name: str, scopes: Iterable[str], prefixes: Iterable[str]) -> str:
    """Add a new token to the tokens file (created 0600 if missing) and return it: the only
    time it exists in plain text."""
    entry: dict[str, Any] = {"name": name, "scopes": sorted(set(scopes)),
                             "prefixes": list(dict.fromkeys(prefixes))}
    token_id, token = new_token()
    entry = {"id": token_id, **entry, "sha256": hash_token(token), "created": round(time.time())}
    path = Path(path)
    data: dict[str, Any] = {"version": 1, "tokens": []}
    if path.exists() and path.read_text().strip():
        data = json.loads(path.read_text())
        parse_tokens(path.read_text(), str(path))  # refuse to extend a broken file
    _principal(entry, "new token")
    data["tokens"].append(entry)
    _write_private(path, json.dumps(data, indent=2) + "\n")
    return token


def revoke_token(path: Path, token_id: str) -> bool:
    """Remove the token with id ``token_id``; False if there was none."""
    data = json.loads(Path(path).read_text())
    kept = [t for t in data["tokens"] if t.get("id") != token_id]
    if len(kept) == len(data["tokens"]):
        return False
    data["tokens"] = kept
    _write_private(Path(path), json.dumps(data, indent=2) + "\n")
    return True


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
