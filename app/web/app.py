"""The composition root: create_app(config) returns the ASGI application
uvicorn serves: the data plane (app.web.dataplane) in front of a FastAPI
application for the ops, admin and console routes and the docs. The node itself is
opened in the lifespan, with the HTTP peer client and the membership source
the config names, and put in the slot both halves read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.access import AuthFile
from app.cluster.node import Node
from app.config import NodeConfig
from app.errors import KvstoreError
from app.membership.base import MembershipSource
from app.membership.static import StaticMembership
from app.metrics import NodeMetrics
from app.storage import check_data_dir
from app.transport.http import HttpPeerClient
from app.transport.tls import TlsMaterial
from app.web import access
from app.web.dataplane import DataPlane
from app.web.errors import error_body, headers_for, status_for
from app.web.openapi import merge_raw_routes
from app.web.routes_admin import router as admin_router
from app.web.routes_backup import router as backup_router
from app.web.routes_console import router as console_router
from app.web.routes_ops import router as ops_router
from app.web.routes_ui import router as ui_router
from app.web.slot import NodeSlot


def create_app(config: NodeConfig, *, metrics: NodeMetrics | None = None, tls: TlsMaterial | None = None) -> DataPlane:
    """tls: the node's TLS material when it serves HTTPS (the CLI builds it,
    since uvicorn listens with its server context); watched for rotation here."""
    # Settings that cannot work fail here, before the server starts: one ConfigError line
    # from the CLI, not a lifespan traceback (and no peer client left open behind it).
    check_data_dir(config)
    source = membership_source(config)
    slot = NodeSlot()
    metrics = metrics or NodeMetrics()
    auth_file = None if config.auth_file is None else AuthFile(config.auth_file, on_reload=metrics.count_auth_reload)
    guard = None if auth_file is None else access.Guard(auth_file, on_denied=metrics.count_auth_denied)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        peer_client = HttpPeerClient(
            timeout_s=config.peer_timeout,
            token=config.cluster_token,
            resolve=config.resolve,
            self_id=config.node_id,
            tls=tls,
        )
        try:
            node = await Node.open(config, peer_client=peer_client, source=source, metrics=metrics)
        except BaseException:
            await peer_client.close()
            raise
        slot.node = node
        watchers = [asyncio.create_task(tls.watch())] if tls is not None else []
        if auth_file is not None:
            watchers.append(asyncio.create_task(access.watch(auth_file)))
        try:
            yield
            await node.drain()
        finally:
            slot.node = None
            for watcher in watchers:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await node.close()

    api = FastAPI(
        title="kvstore",
        version=__version__,
        description="A distributed key-value store with consistent hashing.",
        lifespan=lifespan,
    )
    api.state.slot = slot
    api.state.metrics = metrics
    api.include_router(ops_router)
    api.include_router(admin_router)
    api.include_router(backup_router)
    api.include_router(console_router)
    api.include_router(ui_router)
    _install_error_handlers(api)
    _install_openapi(api)
    return DataPlane(
        slot=slot,
        metrics=metrics,
        cluster_token=config.cluster_token,
        max_value_bytes=config.max_value_bytes,
        fallback=api,
        require_peer_certificate=tls is not None and tls.requires_peer_certificate,
        guard=guard,
    )


def membership_source(config: NodeConfig) -> MembershipSource:
    if config.membership == "kubernetes":
        from app.membership.kubernetes import KubernetesMembership  # the kubernetes client loads only when used

        return KubernetesMembership.from_config(config)
    return StaticMembership(config.peers)


def _install_error_handlers(api: FastAPI) -> None:
    """Every error a FastAPI route raises answers {"error": ...}, like the data plane."""

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _error_response(message, exc.status_code, exc.headers)

    @api.exception_handler(KvstoreError)
    async def app_error(request: Request, exc: KvstoreError) -> Response:
        status = status_for(exc)
        return _error_response(str(exc), status, headers_for(exc, status))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error_response(f"invalid request: {problems}", 422)


def _error_response(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    """An error answer with the data plane's body (app.web.errors.error_body)."""
    return Response(error_body(message), status_code=status, headers=headers, media_type="application/json")


def _install_openapi(api: FastAPI) -> None:
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = merge_raw_routes(generate())
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
