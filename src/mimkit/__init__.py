"""mimkit: masked image modeling toolkit."""

__version__ = "0.1.0"
