"""The .cod v1 container: compact headers, exact round trips of every field, and every malformed input refused
with a BitstreamError (a ValueError), never another exception or a hang."""
from __future__ import annotations

import random

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


def test_fuzz_mutated_bitstreams_only_raise_bitstream_errors():
    rng = random.Random(0)
    seeds = [make(h, w, params)[0] for h, w, params in
             [(512, 512, None), (1, 1, None), (3000, 20, DecodeParams("adam3", 9, 2.0, 77)), (17, 513, None)]]
    outcomes = {"ok": 0, "error": 0}
    for i in range(3000):
        data = bytearray(rng.choice(seeds))
        kind = i % 5
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data = data[: rng.randrange(len(data) + 1)]
        elif kind == 2:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        elif kind == 3:
            data = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        else:
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        try:
            container.read(bytes(data), FP, size_fn)
            outcomes["ok"] += 1
        except BitstreamError:
            outcomes["error"] += 1
    assert outcomes["ok"] + outcomes["error"] == 3000
    assert outcomes["error"] > 2800  # a CRC-8 lets about 1 in 256 random corruptions through
