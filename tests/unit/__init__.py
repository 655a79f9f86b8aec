"""Unit tests: one module at a time, in process, no server."""
