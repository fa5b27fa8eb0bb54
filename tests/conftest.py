import os

from hypothesis import settings

# The first example pays JIT compilation, so no deadline; CI runs fewer examples than a long run by hand.
settings.register_profile("ci", max_examples=30, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("long", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
