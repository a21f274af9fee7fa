"""Expert weight quantization (GPTQ via llm-compressor, RTN, HQQ via hqq), bit packing, and storage."""
from .core import (METHODS, QuantizedExperts, QuantSpec, dequantize, expert_nbytes, quantize_all_widths,
                   quantize_experts, quantize_experts_hqq, quantize_experts_widths, relative_output_error)
from .model import quantize_model_experts
from .packing import pack_codes, packed_row_bytes, unpack_codes
from .store import FORMAT, FORMAT_VERSION, QuantizedWriter, load_quantized, save_quantized

__all__ = [
    "METHODS", "QuantSpec", "QuantizedExperts", "quantize_experts", "quantize_experts_hqq", "quantize_all_widths",
    "QuantizedWriter", "quantize_experts_widths", "quantize_model_experts",
    "dequantize", "expert_nbytes", "relative_output_error", "pack_codes", "unpack_codes", "packed_row_bytes",
    "save_quantized", "load_quantized", "FORMAT", "FORMAT_VERSION",
]
