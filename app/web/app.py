"""The composition root: builds a Node from its config, the aiohttp peer
client, the FastAPI application, and the data plane in front of it.

create_app(config) returns the ASGI application uvicorn serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.cluster.node import Node
from app.config import NodeConfig
from app.discovery.base import MembershipSource
from app.discovery.static import StaticMembership
from app.errors import KvstoreError
from app.transport.http import HttpPeerClient
from app.web.dataplane import DataPlane
from app.web.errors import status_for
from app.web.openapi import merge_data_routes
from app.web.routes_internal import admin as admin_router
from app.web.routes_internal import internal as internal_router
from app.web.routes_ops import router as ops_router


def create_app(config: NodeConfig) -> DataPlane:
    node = Node(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        transport = HttpPeerClient(timeout_s=config.peer_timeout, token=config.cluster_token, resolve=config.resolve)
        await node.start(transport, source=membership_source(config))
        try:
            yield
            await node.drain()
        finally:
            await node.stop()

    api = FastAPI(
        title="kvstore",
        version=__version__,
        description="A distributed key-value store with consistent hashing.",
        lifespan=lifespan,
    )
    api.state.node = node
    api.include_router(ops_router)
    api.include_router(admin_router)
    api.include_router(internal_router)
    _install_error_handlers(api)
    _install_openapi(api)
    return DataPlane(node=node, fallback=api)


def membership_source(config: NodeConfig) -> MembershipSource:
    if config.membership == "kubernetes":
        from app.discovery.kubernetes import KubernetesMembership  # the kubernetes client loads only when used

        return KubernetesMembership.from_config(config)
    return StaticMembership(config.peers)


def _install_error_handlers(api: FastAPI) -> None:
    """Every error FastAPI itself produces answers {"error": ...}, like the data plane."""

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(KvstoreError)
    async def app_error(request: Request, exc: KvstoreError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=status_for(exc))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)


def _install_openapi(api: FastAPI) -> None:
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = merge_data_routes(generate())
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
