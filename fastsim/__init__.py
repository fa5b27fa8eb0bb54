"""fastsim: predicts what an LLM-serving deployment does under a workload, in seconds, with no GPU."""
from fastsim.errors import FastsimError

__version__ = "0.1.0"


def simulate(config=None, overrides=None):
    """Run a config (a fastsim.config.Config, a YAML path, a dict of the YAML's sections, or None
    for the built-in default);
    returns a Result with .requests (pyarrow.Table), .summary (dict) and .to_pandas()."""
    from fastsim.simulation import simulate as _simulate

    return _simulate(config, overrides)


__all__ = ["FastsimError", "__version__", "simulate"]
