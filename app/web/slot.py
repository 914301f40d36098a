"""Where the web layer finds the node it serves. The node is opened in the
application's lifespan, after the ASGI app exists; until then the slot is
empty and every route that needs the node answers 503. The data plane and
the FastAPI routes (request.app.state.slot) share one slot.
"""

from __future__ import annotations

from fastapi import Request

from app.cluster.node import Node
from app.errors import NodeStartingError


class NodeSlot:
    def __init__(self) -> None:
        self.node: Node | None = None

    def require(self) -> Node:
        if self.node is None:
            raise NodeStartingError("node is starting: store not open yet")
        return self.node


def node_of(request: Request) -> Node:
    """The node, for a FastAPI route (NodeStartingError while it opens)."""
    slot: NodeSlot = request.app.state.slot
    return slot.require()
