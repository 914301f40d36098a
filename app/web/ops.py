"""The ops listener's application (--ops-listen): /health, /ready and /metrics
only, in plain HTTP, with no credentials, like etcd's --listen-metrics-urls.

Probes and Prometheus go here, so the data port can require client
certificates or tokens without the kubelet (whose HTTPS probes present no
certificate) or a scraper needing any. It shares the node's slot and
metrics with the data plane (app.web.app builds both); the CLI serves it.
"""

from __future__ import annotations

import orjson

from app.metrics import CONTENT_TYPE_LATEST, NodeMetrics
from app.web.asgi import TEXT, Receive, Reply, Scope, Send, json_error
from app.web.routes_ops import readiness
from app.web.slot import NodeSlot

OPS_ROUTES = ("/health", "/ready", "/metrics")
OK_HEALTH = Reply(200, b"OK", TEXT)


class OpsPlane:
    """The ASGI app of the ops listener."""

    def __init__(self, *, slot: NodeSlot, metrics: NodeMetrics) -> None:
        self.slot = slot
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no lifespan: the data plane's app owns the node
            return
        path, method = scope["path"], scope["method"]
        head = method == "HEAD"
        if path not in OPS_ROUTES:
            reply = json_error(404, f"the ops listener serves {', '.join(OPS_ROUTES)} only; {path} is on the data port")
        elif method not in ("GET", "HEAD"):
            refusal = orjson.dumps({"error": f"{path} answers GET (and HEAD) only"})
            reply = Reply(405, refusal, headers=[(b"allow", b"GET")])
        elif path == "/health":
            reply = OK_HEALTH
        elif path == "/ready":
            status, body = readiness(self.slot)
            reply = Reply(status, orjson.dumps(body))
        else:
            reply = Reply(200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())
        await reply.send(send, head=head)
