"""Numba kernels. The only package that imports numba; everything here takes arrays and scalars."""
from fastsim.engine import indexing

indexing.install()
