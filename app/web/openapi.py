"""OpenAPI descriptions of the routes the data plane answers outside FastAPI's
router (routes_data, routes_peer, /health), merged into the generated document
so /openapi.json describes every route a client or a peer can call."""

from __future__ import annotations

from typing import Any

from app.cluster.coordinator import Consistency
from app.transport.base import (
    BATCH_PATH,
    CLOCK_PATH,
    DIGESTS_PATH,
    KV_PATH,
    MEMBERSHIP_PATH,
    RANGE_PATH,
    READS_PATH,
    SHARED_DIGEST_PATH,
    SYNCING_PATH,
    WRITES_PATH,
)

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_KEY_QUERY = {
    "name": "key",
    "in": "query",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 1024},
}
_KEY_PATH = {
    "name": "key",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "UTF-8, 1 to 1024 bytes, percent-encoded",
}
_CONSISTENCY = {
    "name": "consistency",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": [str(level) for level in Consistency], "default": str(Consistency.QUORUM)},
}
_TTL = {
    "name": "ttl",
    "in": "query",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "seconds until the key expires",
}
_VERSION = {"x-kvstore-version": {"schema": {"type": "string"}, "description": "the write's hybrid-clock version"}}
_STD_ERRORS = {"400": _ERROR, "503": _ERROR}

RAW_ROUTES_OPENAPI: dict[str, Any] = {
    "/put": {
        "put": {
            "tags": ["JSON API"],
            "summary": "Store a key-value pair (JSON body)",
            "parameters": [_CONSISTENCY],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PutBody"}}},
            },
            "responses": {
                "200": {"description": "Stored", "content": {"application/json": {"schema": {"type": "object"}}}},
                "413": _ERROR,
                **_STD_ERRORS,
            },
        },
    },
    "/get": {
        "get": {
            "tags": ["JSON API"],
            "summary": "Read a key (JSON answer)",
            "parameters": [_KEY_QUERY, _CONSISTENCY],
            "responses": {
                "200": {
                    "description": "Found",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/KeyValue"}}},
                },
                "404": _ERROR,
                "406": _ERROR,
                **_STD_ERRORS,
            },
        },
    },
    "/delete": {
        "delete": {
            "tags": ["JSON API"],
            "summary": "Delete a key",
            "parameters": [_KEY_QUERY, _CONSISTENCY],
            "responses": {"200": {"description": "Deleted"}, "404": _ERROR, **_STD_ERRORS},
        },
    },
    "/health": {
        "get": {
            "tags": ["operations"],
            "summary": "Liveness: 'OK' while the process serves",
            "responses": {
                "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string", "example": "OK"}}}}
            },
        },
    },
    "/kv/{key}": {
        "get": {
            "tags": ["REST API"],
            "summary": "Read a value as raw bytes",
            "parameters": [_KEY_PATH, _CONSISTENCY],
            "responses": {
                "200": {
                    "description": "The value",
                    "headers": _VERSION,
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                },
                "404": _ERROR,
                **_STD_ERRORS,
            },
        },
        "put": {
            "tags": ["REST API"],
            "summary": "Store raw bytes (binary-safe)",
            "parameters": [_KEY_PATH, _CONSISTENCY, _TTL],
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {"204": {"description": "Stored", "headers": _VERSION}, "413": _ERROR, **_STD_ERRORS},
        },
        "delete": {
            "tags": ["REST API"],
            "summary": "Delete a key (idempotent)",
            "parameters": [_KEY_PATH, _CONSISTENCY],
            "responses": {"204": {"description": "Deleted (or was absent)"}, **_STD_ERRORS},
        },
    },
    "/batch/get": {
        "post": {
            "tags": ["REST API"],
            "summary": 'Read up to 256 keys: {"keys": [K, ...]} -> {"values": {K: base64 value}} (absent: left out)',
            "parameters": [_CONSISTENCY],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {
                "200": {
                    "description": "The values found",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "413": _ERROR,
                **_STD_ERRORS,
            },
        },
    },
    "/batch/put": {
        "post": {
            "tags": ["REST API"],
            "summary": 'Write up to 256 keys: {"items": {K: base64 value}[, "ttl": S]} -> {"versions": {K: V}}; '
            "not atomic: on an error some keys may be stored (retrying is safe)",
            "parameters": [_CONSISTENCY],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {
                "200": {"description": "Stored", "content": {"application/json": {"schema": {"type": "object"}}}},
                "413": _ERROR,
                "507": _ERROR,
                **_STD_ERRORS,
            },
        },
    },
    KV_PATH + "{key}": {
        "get": {
            "tags": ["internal"],
            "summary": "Replica read (node to node; needs x-kvstore-token when a cluster token is set)",
            "parameters": [_KEY_PATH],
            "responses": {
                "200": {"description": "The replica's record"},
                "404": {"description": "No record"},
                "401": _ERROR,
                "403": _ERROR,
            },
        },
        "put": {
            "tags": ["internal"],
            "summary": "Replica write (node to node; needs x-kvstore-token when a cluster token is set)",
            "parameters": [_KEY_PATH],
            "responses": {"200": {"description": "Applied or ignored as older"}, "401": _ERROR, "403": _ERROR},
        },
    },
    WRITES_PATH: {
        "post": {
            "tags": ["internal"],
            "summary": "Coalesced replica writes: up to 64 framed records (app/transport/codec.py); "
            "one answer per write, with the newer version a replica kept instead",
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {
                "200": {"description": "Applied flags, in request order"},
                "400": _ERROR,
                "401": _ERROR,
                "403": _ERROR,
                "413": _ERROR,
            },
        },
    },
    READS_PATH: {
        "post": {
            "tags": ["internal"],
            "summary": "Coalesced replica reads: up to 64 framed keys; a flag byte and the record, per key",
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": {
                "200": {"description": "Answers, in request order"},
                "400": _ERROR,
                "401": _ERROR,
                "403": _ERROR,
                "413": _ERROR,
            },
        },
    },
    CLOCK_PATH: {
        "get": {
            "tags": ["internal"],
            "summary": "This node's wall clock, for its peers' clock-offset probes",
            "responses": {"200": {"description": '{"node_id": ..., "wall_ms": ...}'}, "401": _ERROR, "403": _ERROR},
        },
    },
    **{
        path: {
            "post": {
                "tags": ["internal"],
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {content: {"schema": {"type": "object" if content == "application/json" else "string"}}},
                },
                "responses": {
                    "200": {"description": "Done"},
                    "400": _ERROR,
                    "401": _ERROR,
                    "403": _ERROR,
                    "409": _ERROR,
                },
            },
        }
        for path, summary, content in (
            (BATCH_PATH, "Apply many replica records, last writer wins (framed records)", "application/octet-stream"),
            (DIGESTS_PATH, "Digest of this node's records in each arc (anti-entropy)", "application/octet-stream"),
            (
                SHARED_DIGEST_PATH,
                "One digest over every arc this node and the asker both replicate (anti-entropy's first comparison)",
                "application/json",
            ),
            (
                RANGE_PATH,
                "Every record this node holds in the arcs (rebalancing, anti-entropy)",
                "application/octet-stream",
            ),
            (SYNCING_PATH, "The arcs this node is still pulling after a membership change", "application/octet-stream"),
            (MEMBERSHIP_PATH, "Take a new member list from another node, without propagating it", "application/json"),
        )
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "KeyValue": {
        "type": "object",
        "required": ["key", "value"],
        "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
    },
    "PutBody": {
        "type": "object",
        "required": ["key", "value"],
        "properties": {
            "key": {"type": "string"},
            "value": {"type": "string"},
            "ttl": {"type": "number", "exclusiveMinimum": 0},
        },
    },
}


def merge_raw_routes(document: dict[str, Any]) -> dict[str, Any]:
    document.setdefault("paths", {}).update(RAW_ROUTES_OPENAPI)
    document.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
    return document
