"""Hosts written in Python: the client (``bridge.Worker``), the demo, and the replay driver."""
