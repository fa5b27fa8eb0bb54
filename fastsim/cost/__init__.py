"""The roofline cost model: how long one engine iteration takes on a model, GPU and batch."""
from fastsim.cost.model import CostModel, ForwardTime
from fastsim.cost.profile import CostProfile, default_profile, load_profile

__all__ = ["CostModel", "CostProfile", "ForwardTime", "default_profile", "load_profile"]
