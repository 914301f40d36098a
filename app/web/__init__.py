"""The HTTP layer, one job per file:

- app.py: the composition root (create_app: data plane, FastAPI, lifespan);
- dataplane.py: the ASGI entry point, dispatch only;
- asgi.py: the toolkit for raw routes (Reply, bodies, token and method checks);
- routes_data.py: the public key-value routes (/get, /put, /delete, /kv/{key});
- routes_peer.py: every node-to-node route under /internal/v1/;
- routes_admin.py: /admin/ (membership changes, rebalancing progress);
- routes_ops.py: /ready, /ring, /metrics;
- routes_backup.py: /admin/backup and /admin/restore;
- access.py: access control's guard (who a request is, whether they may);
- ops.py: the --ops-listen app (/health, /ready, /metrics only);
- errors.py: app errors -> HTTP statuses, headers and bodies;
- keys.py, members.py: parsing request parts; slot.py: the node being served;
- openapi.py: the raw routes' descriptions in /openapi.json.
"""
