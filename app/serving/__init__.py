"""The request path: decode → batch → predict → encode, plus metrics."""
