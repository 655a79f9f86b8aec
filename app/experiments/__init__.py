"""Serving experiments: /compare, A/B routing, shadow traffic and the agreement they share."""
