"""The `.cod` container, version 1 (specified byte by byte in docs/bitstream.md).

A 64-bit image payload makes every header byte count, so the header is a bit string:

    version (3 bits) | payload mode (1) | has decode parameters (1) | n - 1 (4) | H - 1 (n) | W - 1 (n) |
    model tag (8) | zero padding to a byte boundary
    then: check byte, [decode parameters], payload

n is the bit width of the larger of H - 1 and W - 1 (sides 1..65536), so ordinary sizes (sides up to 2048)
take 5 header bytes + 1 check byte = 6. The model tag is the first byte of the model's sha256 fingerprint (a
quick "wrong model" answer); the check byte is the low byte of CRC-32 over the *full* fingerprint, the header,
the parameters and the payload, so corruption and a wrong model are both caught.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from cod.errors import CodError

FORMAT_VERSION = 1
PAYLOAD_FIXED = 0      # fixed-length indices (cod.codec.bitpack); the payload's length follows from the size
PAYLOAD_TYPED = 1      # a typed payload: a type byte, then that type's bytes up to the end of the file
# Typed-payload types: append only, never renumber.
TYPE_ENTROPY_INDICES = 0x00  # the indices, entropy-coded under the model's prior (docs/entropy.md)
TYPE_DIFFC = 0x01            # DiffC (docs/diffc.md)
PAYLOAD_TYPES = {TYPE_ENTROPY_INDICES: "entropy-coded indices", TYPE_DIFFC: "DiffC"}
MAX_SIDE = 1 << 16
FLOAT16_MAX = 65504.0  # largest finite IEEE half: the guidance scale is stored as one
# Decode-parameter sampler ids: append only, never renumber (files store these numbers).
SAMPLER_IDS = ("adam2", "adam1", "adam3", "adam4", "euler", "euler_sde", "euler_sde_mean", "euler_sde_preserve")


class BitstreamError(CodError):
    """A .cod file that cannot be decoded (malformed, corrupted, truncated, or written by another model)."""


@dataclass(frozen=True)
class DecodeParams:
    """Sampling choices stored in a file when they differ from the model's documented defaults."""

    sampler: str = "adam2"
    steps: int = 25
    cfg: float = 3.0
    seed: int = 0

    def encode(self) -> bytes:
        if self.sampler not in SAMPLER_IDS:
            raise ValueError(f"sampler '{self.sampler}' cannot be stored in a .cod file")
        if not 1 <= self.steps <= 256:
            raise ValueError(f"steps must be 1-256 to be stored in a .cod file, got {self.steps}")
        if not 0 <= self.seed < 1 << 32:
            raise ValueError(f"seed must be in [0, 2^32), got {self.seed}")
        if not abs(self.cfg) <= FLOAT16_MAX:  # also refuses NaN, which no reader would accept
            raise ValueError(f"guidance scale must be a finite number within +-{FLOAT16_MAX:g} to be stored in a "
                             f".cod file (IEEE half precision), got {self.cfg}")
        return bytes([SAMPLER_IDS.index(self.sampler), self.steps - 1]) + struct.pack("<e", self.cfg) + \
            _varint(self.seed)


@dataclass(frozen=True)
class Header:
    height: int
    width: int
    model_tag: int
    payload_mode: int = PAYLOAD_FIXED
    params: DecodeParams | None = None
    payload_type: int | None = None  # the type byte of a typed payload (PAYLOAD_TYPED)


def model_tag(fingerprint: str) -> int:
    return bytes.fromhex(fingerprint)[0]


def check_size(height: int, width: int) -> None:
    """Raise ValueError unless a v1 header can hold this size (checked before any coding work)."""
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise ValueError(f"image size {height}x{width} is outside what a .cod file holds (sides 1..{MAX_SIDE})")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_seed(data: bytes, pos: int) -> tuple[int, int]:
    """The seed varint at `pos` -> (seed, position after it). Only the shortest encoding of a value below 2^32
    is accepted, so every seed has exactly one byte string (the writer's) and the payload offset is unambiguous."""
    value = 0
    for i in range(5):
        if pos + i >= len(data):
            raise BitstreamError("file ends inside the decode parameters (truncated)")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if (i and not byte) or value >= 1 << 32:
                break
            return value, pos + i + 1
    raise BitstreamError("malformed seed in the decode parameters (corrupted file)")


def _check_byte(fingerprint: str, body: bytes, key: bytes = b"") -> int:
    """Low byte of CRC-32 over the model's fingerprint, any further key (the prior's fingerprint for entropy-coded
    indices: a file then checks only with the model *and* the prior it was written with) and the file's body."""
    return zlib.crc32(bytes.fromhex(fingerprint) + key + body) & 0xFF


def _header_bits(h: Header) -> bytes:
    check_size(h.height, h.width)
    n = max((h.height - 1).bit_length(), (h.width - 1).bit_length(), 1)
    fields = [(FORMAT_VERSION, 3), (h.payload_mode, 1), (h.params is not None, 1), (n - 1, 4),
              (h.height - 1, n), (h.width - 1, n), (h.model_tag, 8)]
    value, nbits = 0, 0
    for field, width in fields:
        value = (value << width) | int(field)
        nbits += width
    pad = -nbits % 8
    return (value << pad).to_bytes((nbits + pad) // 8, "big")


def write(header: Header, payload: bytes, fingerprint: str, key: bytes = b"") -> bytes:
    """A file's bytes. A typed payload (header.payload_mode PAYLOAD_TYPED) starts with its type byte, which must be
    header.payload_type; `key` is extra bytes the check byte covers (see _check_byte)."""
    if header.payload_mode == PAYLOAD_TYPED:
        if not payload or header.payload_type not in (None, payload[0]):
            raise ValueError("a typed payload starts with its type byte (the header's payload_type, when given)")
    elif header.payload_type is not None or key:
        raise ValueError("a fixed-length payload has no type and no extra check key")
    head = _header_bits(header)
    params = header.params.encode() if header.params is not None else b""
    body_after_check = params + bytes(payload)
    check = _check_byte(fingerprint, head + body_after_check, key)
    return head + bytes([check]) + body_after_check


def read_header(data: bytes) -> tuple[Header, int, int]:
    """Parse the header (no integrity check yet) -> (header, offset of the check byte, offset of the payload)."""
    data = bytes(data)
    if len(data) < 2:
        raise BitstreamError(f"a .cod file has at least 2 bytes; got {len(data)}")
    version = data[0] >> 5
    if version != FORMAT_VERSION:
        raise BitstreamError(f"unsupported .cod format version {version} (this cod reads version "
                             f"{FORMAT_VERSION}); is this an official-format file? try --format official")
    mode = (data[0] >> 4) & 1
    has_params = (data[0] >> 3) & 1
    n = ((data[0] & 0x7) << 1 | data[1] >> 7) + 1
    nbits = 9 + 2 * n + 8
    head_len = (nbits + 7) // 8
    if len(data) < head_len + 1:
        raise BitstreamError("file ends inside the header (truncated)")
    value = int.from_bytes(data[:head_len], "big") >> (head_len * 8 - nbits)
    tag = value & 0xFF
    width = ((value >> 8) & ((1 << n) - 1)) + 1
    height = ((value >> (8 + n)) & ((1 << n) - 1)) + 1
    if int.from_bytes(data[:head_len], "big") & ((1 << (head_len * 8 - nbits)) - 1):
        raise BitstreamError("non-zero padding bits in the header (corrupted file)")
    params = None
    pos = head_len + 1
    if has_params:
        if len(data) < pos + 5:
            raise BitstreamError("file ends inside the decode parameters (truncated)")
        sampler_id, steps_m1 = data[pos], data[pos + 1]
        if sampler_id >= len(SAMPLER_IDS):
            raise BitstreamError(f"unknown sampler id {sampler_id} in the decode parameters")
        (cfg,) = struct.unpack("<e", data[pos + 2:pos + 4])
        if cfg != cfg or abs(cfg) == float("inf"):
            raise BitstreamError("invalid guidance scale in the decode parameters")
        seed, pos = _read_seed(data, pos + 4)
        params = DecodeParams(SAMPLER_IDS[sampler_id], steps_m1 + 1, float(cfg), seed)
    payload_type = None
    if mode == PAYLOAD_TYPED:
        if len(data) <= pos:
            raise BitstreamError("file ends before its payload type (truncated)")
        payload_type = data[pos]
        if payload_type not in PAYLOAD_TYPES:
            raise BitstreamError(f"unknown payload type {payload_type:#04x} (this cod reads "
                                 f"{', '.join(f'{t:#04x} ({n})' for t, n in PAYLOAD_TYPES.items())}); the file "
                                 f"is corrupted or needs a newer cod")
    return Header(height, width, tag, mode, params, payload_type), head_len, pos


def read(data: bytes, fingerprint: str, payload_size, typed_key=None) -> tuple[Header, bytes]:
    """Parse and verify a file written for the model with `fingerprint` -> (header, payload; a typed payload
    starts with its type byte).

    payload_size(height, width) -> the exact payload length that model writes for that size (fixed-length mode).
    typed_key(header, payload) -> the extra bytes the check byte of a typed payload covers; it raises BitstreamError
    for a type the caller cannot decode (say, entropy-coded indices and a model without a prior). Without it, a typed
    payload is checked with no extra key (DiffC), and entropy-coded indices are refused.
    """
    data = bytes(data)
    header, check_pos, start = read_header(data)
    if header.model_tag != model_tag(fingerprint):
        raise BitstreamError(f"this file was written by another model (its model tag is {header.model_tag:02x}; "
                             f"this model's fingerprint is {fingerprint[:16]}..., tag {fingerprint[:2]}): decode it "
                             f"with the model that compressed it")
    key = b""
    if header.payload_mode == PAYLOAD_TYPED:
        if typed_key is not None:
            key = typed_key(header, data[start:])
        elif header.payload_type == TYPE_ENTROPY_INDICES:
            raise BitstreamError("this file holds entropy-coded indices, not DiffC: decode it with `cod decompress`")
    else:
        need = payload_size(header.height, header.width)
        if len(data) - start < need:
            raise BitstreamError(f"file is truncated: payload has {max(0, len(data) - start)} of {need} bytes")
        if len(data) - start > need:
            raise BitstreamError(f"file has {len(data) - start - need} unexpected trailing bytes")
    if _check_byte(fingerprint, data[:check_pos] + data[check_pos + 1:], key) != data[check_pos]:
        raise BitstreamError("integrity check failed: the file is corrupted (or was written by another model "
                             "whose tag happens to match)")
    return header, data[start:]


def require_mode(header: Header, payload_type: int | None) -> None:
    """Refuse a file whose payload another decoder reads (payload_type None: the fixed-length indices)."""
    if header.payload_type == payload_type:
        return
    if header.payload_type == TYPE_DIFFC:
        raise BitstreamError("this is a DiffC file: decode it with `cod diffc decompress`")
    if payload_type == TYPE_DIFFC:
        raise BitstreamError("this is not a DiffC file (it holds the CoD indices alone): decode it with "
                             "`cod decompress`")
    raise BitstreamError(f"this file's payload ({PAYLOAD_TYPES.get(header.payload_type, 'fixed-length indices')}) "
                         f"is not what this decoder reads")
