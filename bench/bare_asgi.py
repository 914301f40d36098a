"""The reference: a bare ASGI app answering a constant, under the node's uvicorn settings.

Every ratio in BENCHMARKS.md divides by what this serves in the same run. It
reads (and drops) a request body, so a PUT costs it the same socket work as
the node's. The uvicorn settings below mirror app/web/server.py:serve exactly
(uvloop, httptools, one worker, lifespan on, no access log, no server header);
keep the two in step. Also the backend the peer-client bench forwards to.

    .venv/bin/python -m bench bare_asgi --port 9000
"""

from __future__ import annotations

import argparse
from typing import Any

BODY = b'{"key":"bench","value":"0123456789abcdef"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
END = {"type": "http.response.body", "body": BODY}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["method"] in ("PUT", "POST"):
        more = True
        while more:  # drain the body, as the node must
            message = await receive()
            more = message.get("more_body", False)
    await send(START)
    await send(END)


def uvicorn_config(asgi_app: Any, *, host: str, port: int) -> Any:
    """The node's uvicorn settings (app/web/server.py:serve), for any benchmark server."""
    import uvicorn

    return uvicorn.Config(
        asgi_app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        workers=1,
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=3,
        server_header=False,
        proxy_headers=False,
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port)).run()


if __name__ == "__main__":
    main()
