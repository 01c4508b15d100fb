"""Index coders: the one seam between a model's index grids and a file's payload.

A coder turns an [h, w] grid of VQ indices into payload bytes and back. `FixedLengthCoder` is the plain packing
(payload mode 0: `bits` per index, cod.codec.bitpack); `EntropyCoder` codes the indices under the model
directory's learned prior (prior.safetensors) with rANS (payload mode 1, type 0x00; docs/entropy.md). A file
records which coder wrote it, and the encoder keeps whichever payload is smaller, so a prior never makes a file
larger than the fixed-length one.
"""
from __future__ import annotations

import numpy as np

from cod.codec.bitpack import pack_indices, packed_size, unpack_indices
from cod.codec.container import PAYLOAD_FIXED, PAYLOAD_TYPED, TYPE_ENTROPY_INDICES, BitstreamError
from cod.entropy.index_coding import decode_grid, encode_grid
from cod.entropy.rans import StreamError


class FixedLengthCoder:
    mode, payload_type = PAYLOAD_FIXED, None

    def __init__(self, bits: int, num_codes: int):
        self.bits, self.num_codes = bits, num_codes

    def size(self, height: int, width: int) -> int:
        return packed_size(height * width, self.bits)

    def encode(self, indices: np.ndarray) -> bytes:
        return pack_indices(indices, self.bits)

    def decode(self, payload: bytes, height: int, width: int) -> np.ndarray:
        indices = unpack_indices(payload, height * width, self.bits).reshape(height, width)
        if indices.max(initial=0) >= self.num_codes:
            raise BitstreamError("payload holds indices outside this model's codebook")
        return indices


class EntropyCoder:
    """Payload: type byte 0x00, the prior's tag (first byte of its sha256), then the rANS stream. The file's check
    byte also covers the prior's full fingerprint, so a file decodes only with the prior that wrote it."""

    mode, payload_type = PAYLOAD_TYPED, TYPE_ENTROPY_INDICES

    def __init__(self, prior, prior_fingerprint: str):
        self.prior, self.fingerprint = prior, prior_fingerprint
        self.tag = bytes.fromhex(prior_fingerprint)[0]

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.fingerprint)

    def encode(self, indices: np.ndarray) -> bytes:
        return bytes([self.payload_type, self.tag]) + encode_grid(self.prior, indices)

    def check_tag(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise BitstreamError("file ends inside its entropy-coded payload's header (truncated)")
        if payload[1] != self.tag:
            raise BitstreamError(f"this file was entropy-coded with another prior (tag {payload[1]:02x}; this model "
                                 f"directory's prior.safetensors has tag {self.tag:02x}): decode it with the model "
                                 f"directory that wrote it")

    def decode(self, payload: bytes, height: int, width: int) -> np.ndarray:
        self.check_tag(payload)
        try:
            return decode_grid(self.prior, payload[2:], height, width)
        except StreamError as e:
            raise BitstreamError(f"entropy-coded payload is malformed ({e})") from None


def no_prior_message(payload: bytes) -> str:
    tag = f" (tag {payload[1]:02x})" if len(payload) > 1 else ""
    return (f"this file's indices were entropy-coded with a learned prior{tag}, and this model directory has no "
            f"prior.safetensors: decode it with the model directory that wrote it (train one with `cod fit-prior`)")
