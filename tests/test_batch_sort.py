"""The event loop's allocation-free sort against Python's sorted()."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastsim.engine.batch_nb import sort_by_key_nb


@given(st.lists(st.integers(-1000, 1000), unique=True, max_size=80), st.integers(0, 5))
def test_sort_by_key_orders_the_first_m_keys_and_carries_their_values(keys, extra):
    m = len(keys)
    k = np.array(keys + [7] * extra, np.int64)   # entries past m must stay untouched
    v = np.arange(m + extra, dtype=np.int64) * 10
    sort_by_key_nb(k, v, m)
    expect = sorted(zip(keys, range(0, 10 * m, 10)))
    assert list(k[:m]) == [key for key, _ in expect]
    assert list(v[:m]) == [val for _, val in expect]
    assert list(k[m:]) == [7] * extra and list(v[m:]) == list(range(10 * m, 10 * (m + extra), 10))
