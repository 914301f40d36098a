"""The cluster layer: who the members are (membership), who answers now
(health), and the coordinator that turns a client request into replica calls."""
