"""The cluster layer: the topology (who the members are and the ring they
form), peer health (who answers now), clock offsets, the replica side, the
coordinator that turns a client request into replica calls, and the
background work that keeps replicas converging (repair, hand-off). node.py
puts them together."""
