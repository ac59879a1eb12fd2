"""SALOR for hf-lowrank-plugins: ``attach(model, "salor", r=16, sparsity=0.5)``.

Sparse (magnitude-pruned) frozen base plus a LoRA initialised to the rank-r SVD of the pruning
residual; optional sparse LoRA factors; bitmap-compressed and portable exports; a fused inference
module.
"""

from importlib.metadata import version

from .bitmap import decode, encode, load_compressed, save_compressed
from .config import SalorConfig
from .export import export_salor, load_compressed_model, save_compressed_model, save_pruned_base
from .fused import build_inference_model
from .model import apply_adapter_masks, attach_salor, sparsity_report, svd_repair, truncation_error
from .prune import base_masks, global_masks, is_semi_structured, magnitude_mask, semi_structured_mask

__all__ = [
    "SalorConfig",
    "apply_adapter_masks",
    "attach_salor",
    "base_masks",
    "build_inference_model",
    "decode",
    "encode",
    "export_salor",
    "global_masks",
    "is_semi_structured",
    "load_compressed",
    "load_compressed_model",
    "magnitude_mask",
    "save_compressed",
    "save_compressed_model",
    "save_pruned_base",
    "semi_structured_mask",
    "sparsity_report",
    "svd_repair",
    "truncation_error",
]
__version__ = version("hf-lowrank-salor")  # the version lives in pyproject.toml only
