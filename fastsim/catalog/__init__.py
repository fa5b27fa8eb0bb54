"""Catalogs: model shapes from Hugging Face `config.json` fields, GPU datasheet figures."""
from fastsim.catalog.gpus import GpuSpec, gpu_ids, load_gpu
from fastsim.catalog.models import BYTES_PER_PARAM, ModelSpec, load_model, model_ids

__all__ = ["BYTES_PER_PARAM", "GpuSpec", "ModelSpec", "gpu_ids", "load_gpu", "load_model", "model_ids"]
