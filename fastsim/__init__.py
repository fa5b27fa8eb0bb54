"""fastsim: predicts what an LLM-serving deployment does under a workload, in seconds, with no GPU."""
from fastsim.errors import FastsimError

__version__ = "0.1.0"

__all__ = ["FastsimError", "__version__"]
