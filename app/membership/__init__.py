"""Discovery sources: where a node learns who is in the ring. static.py (the
peer list from the command line, changed by POST /admin/membership) and
kubernetes.py (the StatefulSet, watched through the Kubernetes API; the only
module importing the kubernetes client)."""
