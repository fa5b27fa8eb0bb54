"""Workloads as structure-of-arrays: arrival times and token counts, sampled in NumPy, seeded."""
from fastsim.workload.generate import BlockSources, Workload, generate_workload

__all__ = ["BlockSources", "Workload", "generate_workload"]
