"""A Fleet-only reverse proxy in front of the SuperLink.

Flower 1.42's SuperLink serves the Fleet API (``/v1/fleet/*``, what SuperNodes call), the
Control API (``/v1/control/*``: start/stop runs, register nodes, list runs; *no
authentication* without Flower's enterprise plugins), the runtime API
(``/v1/runtime/*``), ``/health`` and ``/docs`` on one port. Sites only need Fleet. So:
bind the SuperLink to 127.0.0.1 and expose this proxy instead; it terminates TLS with
the study certificate, forwards ``POST /v1/fleet/<name>`` (headers, including the
SuperNode's signature, and body unchanged) to the SuperLink over TLS, and answers
everything else with 404 without contacting the SuperLink.

Run it: ``sarcofed study proxy --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 --certs DIR``
(or ``python -m server.proxy ...``).
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

#: The only requests forwarded: POST to one Fleet route (lower-case words and dashes).
FLEET_ROUTE = re.compile(r"^/v1/fleet/[a-z][a-z0-9-]*$")
#: Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def is_fleet_request(method: str, path: str) -> bool:
    return method == "POST" and bool(FLEET_ROUTE.match(path))


def _headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in items if k.lower() not in _DROP]


def create_proxy(upstream: str, client: httpx.AsyncClient) -> Starlette:
    """The proxy app. ``upstream`` is ``https://host:port`` of the SuperLink."""
    base = upstream.rstrip("/")

    async def forward(request: Request) -> Response:
        path = request.scope.get("path", "")
        raw = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
        if not is_fleet_request(request.method, path) or (raw and raw != path):
            log.info("proxy refused %s %s from %s", request.method, raw or path, request.client)
            return JSONResponse({"detail": "not exposed: this endpoint serves the Fleet API only"}, 404)
        body = await request.body()
        try:
            answer = await client.post(base + path, content=body, headers=_headers(request.headers.items()))
        except httpx.HTTPError as err:
            log.warning("SuperLink unreachable for %s: %s", path, err)
            return JSONResponse({"detail": "SuperLink unreachable"}, 502)
        return Response(answer.content, answer.status_code, headers=dict(_headers(answer.headers.items())))

    return Starlette(
        routes=[
            Route(
                "/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
            )
        ]
    )


def upstream_client(ca_cert: Path, timeout: float = 120.0) -> httpx.AsyncClient:
    """HTTPS client that trusts only the study CA (the SuperLink's certificate)."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    return httpx.AsyncClient(verify=context, timeout=timeout)


def serve(listen: str, superlink: str, certs_dir: Path) -> None:
    """Serve the proxy with TLS (``server.pem``/``server.key`` from ``sarcofed study certs``)."""
    import uvicorn

    host, _, port = listen.rpartition(":")
    certs_dir = Path(certs_dir)
    app = create_proxy(f"https://{superlink}", upstream_client(certs_dir / "ca.crt"))
    uvicorn.run(
        app,
        host=host or "0.0.0.0",
        port=int(port),
        ssl_certfile=str(certs_dir / "server.pem"),
        ssl_keyfile=str(certs_dir / "server.key"),
        log_level="info",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="0.0.0.0:9092", help="host:port the sites connect to")
    parser.add_argument("--superlink", default="127.0.0.1:9093", help="host:port of the SuperLink (local)")
    parser.add_argument(
        "--certs", type=Path, required=True, help="folder with ca.crt, server.pem, server.key"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(args.listen, args.superlink, args.certs)


if __name__ == "__main__":
    main()
