"""mixtral-cli: run Mixtral-8x7B on one consumer GPU."""

__version__ = "0.1.0"
