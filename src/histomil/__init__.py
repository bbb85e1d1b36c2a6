"""histomil: multiple instance learning for histology."""

__version__ = "0.1.0"
