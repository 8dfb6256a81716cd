"""Fleet-only proxy: Fleet POSTs pass unchanged (signature headers included); Control,
runtime, docs and anything odd get 404 without reaching the SuperLink."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from server.proxy import create_proxy, is_fleet_request


@pytest.fixture
def upstream_calls() -> list[tuple[str, str, bytes, dict[str, str]]]:
    return []


@pytest.fixture
def proxy(upstream_calls: list) -> TestClient:
    async def superlink(request: Request) -> Response:
        body = await request.body()
        upstream_calls.append((request.method, request.url.path, body, dict(request.headers)))
        return Response(b"reply:" + body, 201, media_type="application/protobuf", headers={"x-flwr": "1"})

    fake = Starlette(routes=[Route("/{p:path}", superlink, methods=["GET", "POST"])])
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake))
    return TestClient(create_proxy("https://superlink.test:9093", client))


def test_fleet_post_is_forwarded_unchanged(proxy: TestClient, upstream_calls: list) -> None:
    headers = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00"}
    answer = proxy.post("/v1/fleet/pull-messages", content=b"\x00\x01proto", headers=headers)
    assert answer.status_code == 201
    assert answer.content == b"reply:\x00\x01proto"
    assert answer.headers["x-flwr"] == "1"
    [(method, path, body, sent)] = upstream_calls
    assert (method, path, body) == ("POST", "/v1/fleet/pull-messages", b"\x00\x01proto")
    assert {k: sent[k] for k in headers} == headers
    assert sent["host"] == "superlink.test:9093"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/pull-task-input"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/health"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/fleet/"),
        ("POST", "/v1/fleet/pull-messages/../../control/start-run"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet//control"),
    ],
)
def test_everything_else_is_not_exposed(
    proxy: TestClient, upstream_calls: list, method: str, path: str
) -> None:
    answer = proxy.request(method, path, content=b"x")
    assert answer.status_code == 404
    assert upstream_calls == []


def test_route_rule() -> None:
    assert is_fleet_request("POST", "/v1/fleet/activate-node")
    assert not is_fleet_request("POST", "/v1/fleetx/activate-node")
    assert not is_fleet_request("PUT", "/v1/fleet/activate-node")


def test_unreachable_superlink_is_a_502(upstream_calls: list) -> None:
    async def boom(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(boom))
    answer = TestClient(create_proxy("https://down:1", client)).post("/v1/fleet/get-run", content=b"")
    assert answer.status_code == 502
