"""The packed expert format's sizes, torch-free: the DAG-time checks (memory budgets) and run time (the precision
tiers' bytes, the error table, the store's shapes) read the same formulas.

One projection of one expert, out rows by `in` columns at `bits` bits, stores (quant/store.py has the file layout):
    codes   uint8    [out, packed_row_bytes(in, bits)]   each row one bit stream (packing.py)
    scales  float16  [out, n_groups(in, group_size)]
    zeros   [out, n_groups]: none when symmetric, float16 for hqq's float zero points, uint8 on the integer grid
            of gptq and rtn
"""
from __future__ import annotations

from ..grid import FULL_BITS

SCALE_BYTES = 2  # float16
ZERO_BYTES = {"none": 0, "uint8": 1, "float16": 2}
FULL_BYTES = 2  # a 16-bit (bf16) weight


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes of one row of n codes: ceil(n·bits / 8), rows never sharing a byte."""
    return (n * bits + 7) // 8


def n_groups(n_in: int, group_size: int) -> int:
    """Scale groups per output row: ceil(in / group_size), the last one shorter; group_size ≤ 0 = one per row."""
    return 1 if group_size <= 0 else -(-n_in // group_size)


def zero_dtype(method: str, symmetric: bool) -> str:
    """How zero points are stored: "none" (symmetric), "float16" (hqq's float zero points), "uint8" (the integer
    grid of gptq and rtn)."""
    return "none" if symmetric else ("float16" if method == "hqq" else "uint8")


def packed_expert_bytes(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                        method: str) -> int:
    """Bytes of one expert projection: packed codes + float16 scales + zero points as `method` stores them;
    at FULL_BITS, its 16-bit weight."""
    if bits == FULL_BITS:
        return out_features * in_features * FULL_BYTES
    groups = n_groups(in_features, group_size)
    zero_bytes = ZERO_BYTES[zero_dtype(method, symmetric)]
    return out_features * packed_row_bytes(in_features, bits) + out_features * groups * (SCALE_BYTES + zero_bytes)
