"""kvstore_client: the Python client of kvstore.

    from kvstore_client import Client, AsyncClient, KvstoreError

    with Client(["http://127.0.0.1:8080"]) as kv:
        kv.put("user/42", b"...")
        kv.get("user/42")

Modules: sync (Client), aio (AsyncClient), routing (where calls go), ring
(the cluster's ring, as the nodes publish it), calls (each operation as a
request), errors (the error tree), options (TLS, token, pool).
Its only dependency is httpx; it imports nothing from the server.
"""

from kvstore_client.aio import AsyncClient
from kvstore_client.errors import BadRequest, Forbidden, KvstoreError, StorageFull, Unauthorized, Unavailable
from kvstore_client.sync import Client

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Forbidden",
    "KvstoreError",
    "StorageFull",
    "Unauthorized",
    "Unavailable",
]
__version__ = "0.1.0"
