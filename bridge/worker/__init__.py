"""The runtime: the read loop and dispatch, terminal frames, transport, stdio, the registry,
per-request contexts, host tool calls, sessions.  Imports ``wire`` and ``observe``."""
