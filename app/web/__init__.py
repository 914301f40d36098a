"""The HTTP layer: FastAPI application (app.py), the lean data-path handler
(dataplane.py), operations routes (routes_ops.py), error mapping (errors.py)."""
