import types

import numpy as np
from numba import njit

import fastsim.engine  # noqa: F401  (installs the engine's indexing)

SOURCE = "def last(a):\n    return a[-1]\n"


def _compiled_in(module_name):
    module = types.ModuleType(module_name)
    exec(SOURCE, module.__dict__)
    return njit(module.last)


def test_engine_code_indexes_without_wraparound_and_other_code_keeps_it():
    parent = np.arange(10)
    view = parent[5:]  # index -1 of the view, taken as it is, is the parent's element 4
    assert _compiled_in("fastsim.engine.probe")(view) == 4
    assert _compiled_in("probe")(view) == 9  # Python's a[-1]: the view's last element
