"""Auth against a real gateway: 401 without a valid token, 403 outside its scopes or its
tenants' prefixes, tenants never see each other's streams, the page's cookie session and
its same-origin rule, revocation without a restart, and no anonymous gateway at all."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from sinkstream.gateway.auth import revoke_token
from tests.integration.gateway.server import ROOT, GatewayProcess, Tokens, bearer, gateway_env

ROUTES = [
    ("POST", "/v1/streams/{s}/entries", {"entries": [{"text": "hi"}]}, "publish"),
    ("POST", "/v1/streams/{s}/end", None, "publish"),
    ("GET", "/v1/streams/{s}", None, "read"),
    ("GET", "/v1/streams/{s}/notes", None, "read"),
    ("GET", "/v1/streams/{s}/events", None, "read"),
    ("POST", "/v1/streams/{s}/ask", {"question": "who?", "wait": False}, "ask"),
]


def _call(gw: GatewayProcess, method: str, path: str, body: object,
          headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, gw.url + path, json=body, headers=headers, timeout=5)


@pytest.mark.parametrize("method,path,body,scope", ROUTES)
def test_no_token_or_a_wrong_one_is_401(gateway: GatewayProcess, method: str, path: str,
                                        body: object, scope: str) -> None:
    path = path.format(s="acme-x")
    for headers in ({}, bearer("sst_00000000_not-a-real-token"), bearer("nonsense"),
                    {"Authorization": "Basic YWxhZGRpbjpvcGVu"}):
        reply = _call(gateway, method, path, body, headers)
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method,path,body,scope", ROUTES)
def test_outside_scope_or_tenant_is_403(gateway: GatewayProcess, tokens: Tokens, method: str,
                                        path: str, body: object, scope: str) -> None:
    other_tenant = _call(gateway, method, path.format(s="globex-x"), body, bearer(tokens.acme))
    assert other_tenant.status_code == 403, other_tenant.text
    assert "may not use stream 'globex-x'" in other_tenant.json()["detail"]
    # a prefix is a prefix of the id, not a substring
    sneaky = _call(gateway, method, path.format(s="x-acme-y"), body, bearer(tokens.acme))
    assert sneaky.status_code == 403
    if scope != "read":
        viewer = _call(gateway, method, path.format(s="acme-x"), body, bearer(tokens.acme_read))
        assert viewer.status_code == 403 and f"lacks the {scope!r} scope" in viewer.text


def test_a_tenant_lists_only_its_own_streams(gateway: GatewayProcess, tokens: Tokens) -> None:
    for token, stream in ((tokens.acme, "acme-one"), (tokens.globex, "globex-one"),
                          (tokens.admin, "internal-one")):
        assert _call(gateway, "POST", f"/v1/streams/{stream}/entries",
                     {"entries": [{"text": "hi"}]}, bearer(token)).status_code == 200

    def listed(token: str) -> set[str]:
        reply = httpx.get(gateway.url + "/v1/streams", headers=bearer(token))
        return {s["stream"] for s in reply.json()["streams"]}

    assert "acme-one" in listed(tokens.acme)
    assert all(s.startswith("acme-") for s in listed(tokens.acme))
    assert all(s.startswith("acme-") for s in listed(tokens.acme_read))
    assert listed(tokens.globex) == {"globex-one"}
    assert {"acme-one", "globex-one", "internal-one"} <= listed(tokens.admin)


def test_tokens_are_stored_hashed(tokens: Tokens) -> None:
    stored = tokens.path.read_text()
    for token in (tokens.admin, tokens.acme, tokens.acme_read, tokens.globex):
        secret = token.split("_", 2)[2]
        assert secret not in stored
    assert oct(tokens.path.stat().st_mode & 0o777) == "0o600"


def test_the_page_session_cookie_and_its_same_origin_rule(gateway: GatewayProcess,
                                                          tokens: Tokens) -> None:
    with httpx.Client(base_url=gateway.url) as browser:
        assert browser.post("/v1/session", json={"token": "sst_x_wrong"}).status_code == 401
        signed = browser.post("/v1/session", json={"token": tokens.acme})
        assert signed.status_code == 204
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/v1/streams").status_code == 200
        assert browser.get("/v1/streams/globex-x").status_code == 403
        host = f"127.0.0.1:{gateway.port}"
        same = browser.post("/v1/streams/acme-cookie/entries", json={"entries": [{"text": "a"}]},
                            headers={"Origin": f"http://{host}"})
        assert same.status_code == 200
        cross = browser.post("/v1/streams/acme-cookie/entries",
                             json={"entries": [{"text": "a"}]},
                             headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert browser.delete("/v1/session").status_code == 204
        browser.cookies.clear()
        assert browser.get("/v1/streams").status_code == 401


def test_no_cors_unless_configured(gateway: GatewayProcess, tokens: Tokens) -> None:
    preflight = httpx.options(gateway.url + "/v1/streams", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in preflight.headers
    reply = httpx.get(gateway.url + "/v1/streams",
                      headers={**bearer(tokens.acme), "Origin": "https://app.example"})
    assert "access-control-allow-origin" not in reply.headers


def test_a_revoked_token_stops_working_without_a_restart(gateway: GatewayProcess,
                                                         tokens: Tokens) -> None:
    from sinkstream.gateway.auth import create_token

    token = create_token(tokens.path, "temp", ["read"], ["acme-"])
    deadline = time.monotonic() + 5
    while httpx.get(gateway.url + "/v1/streams", headers=bearer(token)).status_code != 200:
        assert time.monotonic() < deadline, "a new token was not picked up"
        time.sleep(0.2)
    token_id = token.split("_")[1]
    assert revoke_token(tokens.path, token_id)
    deadline = time.monotonic() + 5
    while httpx.get(gateway.url + "/v1/streams", headers=bearer(token)).status_code != 401:
        assert time.monotonic() < deadline, "a revoked token kept working"
        time.sleep(0.2)


def test_the_gateway_refuses_to_start_without_tokens(gw_redis: object, tokens: Tokens) -> None:
    env = gateway_env("redis://127.0.0.1:1/0", tokens.path)
    del env["SINKSTREAM_GATEWAY_TOKENS_FILE"]
    result = subprocess.run([sys.executable, "-m", "sinkstream", "serve", "--port", "1"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no tokens file" in result.stderr and "anonymous" in result.stderr


def test_defaults_are_closed() -> None:
    from sinkstream.settings import Settings

    cfg = Settings()
    assert cfg.gateway_host == "127.0.0.1"
    assert cfg.gateway_cors_origins == []
    assert cfg.gateway_tokens_file is None
