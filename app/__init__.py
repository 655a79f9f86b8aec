"""vitserve: serve dense and compressed Vision Transformers side by side."""

__version__ = "0.1.0"
