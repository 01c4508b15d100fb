"""The .cod v1 container: compact headers, exact round trips of every field, and each class of malformed input
refused with a BitstreamError (a ValueError) that says what is wrong. Random mutations: tests/test_codec_api.py."""
from __future__ import annotations

import pytest

from cod.codec import container
from cod.codec.container import BitstreamError, DecodeParams, Header

FP = "ab" + "12" * 31
OTHER_FP = "cd" + "12" * 31


def size_fn(h, w):
    return ((h + 31) // 32) * ((w + 31) // 32) // 2 + 1


def make(h=512, w=512, params=None, fp=FP):
    payload = bytes((i * 37) % 256 for i in range(size_fn(h, w)))
    return container.write(Header(h, w, container.model_tag(fp), params=params), payload, fp), payload


@pytest.mark.parametrize("h,w,header_bytes", [(512, 512, 6), (768, 512, 6), (2048, 2048, 6), (1, 1, 4),
                                              (17, 513, 6), (3000, 20, 7), (65536, 65536, 8)])
def test_header_size_and_round_trip(h, w, header_bytes):
    data, payload = make(h, w)
    assert len(data) - len(payload) == header_bytes
    header, body = container.read(data, FP, size_fn)
    assert (header.height, header.width, header.params) == (h, w, None)
    assert body == payload


def test_decode_parameters_round_trip():
    params = DecodeParams("euler", 7, 1.25, 123456)
    data, payload = make(params=params)
    header, body = container.read(data, FP, size_fn)
    assert header.params == params and body == payload


def test_wrong_model_truncation_trailing_and_corruption_are_named():
    data, _ = make()
    with pytest.raises(BitstreamError, match="another model"):
        container.read(data, OTHER_FP, size_fn)
    with pytest.raises(BitstreamError, match="truncated"):
        container.read(data[:-1], FP, size_fn)
    with pytest.raises(BitstreamError, match="trailing"):
        container.read(data + b"\0", FP, size_fn)
    flipped = bytearray(data)
    flipped[-3] ^= 0x10
    with pytest.raises(BitstreamError, match="integrity"):
        container.read(bytes(flipped), FP, size_fn)
    with pytest.raises(BitstreamError, match="version"):
        container.read(b"\x00\x02\x00\x02" + data[4:], FP, size_fn)


def test_invalid_values_cannot_be_written():
    with pytest.raises(ValueError):
        container.write(Header(0, 5, 1), b"", FP)
    with pytest.raises(ValueError):
        container.write(Header(65537, 5, 1), b"", FP)
    with pytest.raises(ValueError):
        DecodeParams(steps=300).encode()
    with pytest.raises(ValueError):
        DecodeParams(sampler="heun").encode()
    for cfg in (1e6, float("nan"), float("inf")):  # float16 cannot hold it, or no reader would accept it
        with pytest.raises(ValueError, match="guidance scale"):
            DecodeParams(cfg=cfg).encode()


def test_seed_must_have_its_one_shortest_encoding():
    data, payload = make(params=DecodeParams("adam2", 3, 3.0, 5))
    header, _, start = container.read_header(data)
    seed_at = start - 1
    assert data[seed_at] == 5
    # 5 as the two-byte varint 0x85 0x00, and 2^32 (five bytes): both decode to something, both are refused
    for seed_bytes in (b"\x85\x00", b"\x80\x80\x80\x80\x10"):
        forged = data[:seed_at] + seed_bytes + payload
        with pytest.raises(BitstreamError, match="malformed seed"):
            container.read(forged, FP, size_fn)
