"""Service tests: a real server (or the app in process) over HTTP."""
