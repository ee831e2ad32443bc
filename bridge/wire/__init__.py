"""The wire layer, sans-I/O: packet-4 msgpack framing, protocol v1 events and frames,
every error type, and the JSON view of frames.  It imports nothing else from ``bridge``."""
