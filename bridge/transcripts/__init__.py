"""Transcripts: the format and loader, the recorder, the comparison, readable views, and
``bridge stats --watch``."""
