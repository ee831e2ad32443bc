"""The commands: thin ``@handler`` modules over ``programs`` and ``worker``.  Loaded by name
(``bridge.cli``), never imported by the layers below."""
