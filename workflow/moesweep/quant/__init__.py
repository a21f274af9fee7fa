"""Expert weight quantization (GPTQ via llm-compressor, RTN, HQQ via hqq), bit packing, and storage.

Names load on first use (PEP 562), so importing the torch-free `quant.format` (the DAG-time checks do) does not
import torch or llm-compressor through this package.
"""
import importlib

_HOMES = {
    "core": ("METHODS", "QuantSpec", "QuantizedExperts", "quantize_experts", "quantize_experts_hqq",
             "quantize_all_widths", "quantize_experts_widths", "dequantize", "expert_nbytes", "relative_output_error"),
    "model": ("quantize_model_experts",),
    "packing": ("pack_codes", "unpack_codes"),
    "format": ("packed_row_bytes",),
    "store": ("FORMAT", "FORMAT_VERSION", "QuantizedWriter", "load_quantized", "save_quantized"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
