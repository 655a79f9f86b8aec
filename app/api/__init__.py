"""HTTP layer only: app factory, routes, schemas, error handlers."""
