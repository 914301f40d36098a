"""The one harness for real node processes and the network between them,
shared by tests/integration, tests/k8s and bench/: processes.py starts, waits
for and stops `kvstore node` processes (on `kvstore cluster`'s own code in
app/local_cluster.py), proxy.py puts a TCP proxy with cuts and delays between them.
Imports app.local_cluster and the stdlib only, so a bench can import it without pytest.
"""
