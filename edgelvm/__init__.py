"""edgelvm: vision-language models on the edge."""

__version__ = "0.1.0"
