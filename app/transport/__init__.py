"""Node-to-node calls behind one small interface (base.PeerClient): the aiohttp
client for real traffic (http.py), an in-process fake for unit tests (fake.py)."""
