"""The names of the policies a config chooses among, in the one place the config's choices and the
engine's numbering both read: routers, in the order fastsim.engine.enums numbers them."""

ROUTERS = ("round_robin", "random", "least_requests", "least_kv", "session_affinity", "prefix_aware", "kv_aware")
# A disaggregated pool's router: its prefill pool has no conversations to keep together, and its
# decode pool no cache to be aware of.
PREFILL_ROUTERS = tuple(r for r in ROUTERS if r != "session_affinity")
DECODE_ROUTERS = tuple(r for r in PREFILL_ROUTERS if r != "prefix_aware")
