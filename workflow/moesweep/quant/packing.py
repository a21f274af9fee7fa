"""Bit packing of unsigned integer codes.

Layout (all widths, 2/3/4/8 bits alike): each row along the last dimension is one little-endian bit
stream. Code j of a row occupies bits [j*bits, (j+1)*bits) of that stream, least significant bit first;
bit k of the stream is bit (k % 8) of byte k // 8. A row of n codes takes ceil(n*bits/8) bytes, the
unused high bits of the last byte are zero. Rows never share a byte, so any output row of any expert
can be sliced out of the packed tensor on its own. For 2/4/8 bits this equals the usual "low nibble
first" byte packing; 3 bits packs across byte boundaries (8 codes in 3 bytes) instead of wasting 2 bits
per int32 as the 10-codes-per-word layout would. Implementation: every 8 codes form one <=64-bit integer
(code j shifted by j*bits) that is split into `bits` bytes.
"""
from __future__ import annotations

import torch

from .format import packed_row_bytes

SUPPORTED_BITS = (2, 3, 4, 8)
_CHUNK_CODES = 1 << 22  # bound the int64 temporaries to a few tens of MiB


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _row_chunks(n_rows: int, n: int):
    step = max(1, _CHUNK_CODES // max(n, 1))
    return (slice(r, r + step) for r in range(0, n_rows, step))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer codes in [0, 2**bits) -> [..., ceil(n*bits/8)] uint8."""
    _check_bits(bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    *lead, n = codes.shape
    n8 = -(-n // 8)  # 8 codes of `bits` bits fill exactly `bits` bytes
    rows = codes.reshape(-1, n)
    out = torch.empty(rows.shape[0], n8 * bits, dtype=torch.uint8)
    code_shift = torch.arange(8, dtype=torch.int64) * bits
    byte_shift = torch.arange(bits, dtype=torch.int64) * 8
    for rs in _row_chunks(rows.shape[0], n):
        chunk = torch.nn.functional.pad(rows[rs].to(torch.int64), (0, n8 * 8 - n))
        word = (chunk.reshape(-1, n8, 8) << code_shift).sum(-1, keepdim=True)  # up to 64-bit stream piece
        out[rs] = ((word >> byte_shift) & 0xFF).reshape(-1, n8 * bits).to(torch.uint8)
    return out[:, : packed_row_bytes(n, bits)].contiguous().reshape(*lead, packed_row_bytes(n, bits))


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: [..., ceil(n*bits/8)] uint8 -> [..., n] uint8."""
    _check_bits(bits)
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(f"{nbytes} bytes per row cannot hold {n} codes of {bits} bits")
    n8 = -(-n // 8)
    rows = packed.reshape(-1, nbytes)
    out = torch.empty(rows.shape[0], n8 * 8, dtype=torch.uint8)
    code_shift = torch.arange(8, dtype=torch.int64) * bits
    byte_shift = torch.arange(bits, dtype=torch.int64) * 8
    for rs in _row_chunks(rows.shape[0], n):
        chunk = torch.nn.functional.pad(rows[rs].to(torch.int64), (0, n8 * bits - nbytes))
        word = (chunk.reshape(-1, n8, bits) << byte_shift).sum(-1, keepdim=True)
        out[rs] = ((word >> code_shift) & ((1 << bits) - 1)).reshape(-1, n8 * 8).to(torch.uint8)
    return out[:, :n].contiguous().reshape(*lead, n)
