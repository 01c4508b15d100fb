"""DiffC end to end with tiny models: a file decodes to the encoder's final sample bit for bit (pixel and latent,
conditional and null-condition priors), the rate is the model code length plus fixed bytes, rate control, and
every malformed payload refused with one BitstreamError before any network call."""
from __future__ import annotations

import dataclasses

import math

import numpy as np
import pytest
import torch

import cod
from cod.codec import api, container
from cod.codec.container import BitstreamError, DecodeParams, Header
from cod.diffc import codec, schedule

QUICK = DecodeParams("euler", 2, 3.0, 5)  # a 2-step denoise keeps the tests fast; seed 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models' operations are too small to split over threads: on a busy machine every split op waits
    for a descheduled thread (measured: 13 s instead of 0.1 s for a 5-step latent encode)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pixel():
    torch.manual_seed(0)
    m = cod.new_model("tiny-pixel")
    m.fingerprint = "c4" + "5a" * 31
    return m


@pytest.fixture(scope="module")
def latent():
    m = cod.new_model("tiny-latent")
    m.fingerprint = "7e" + "11" * 31
    return m


def image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def rewrap(model, data: bytes, edit) -> bytes:
    """The file with its payload edited and a valid check byte (so the payload checks themselves are reached)."""
    header, payload = container.read(data, model.fingerprint, lambda h, w: 0)
    header = dataclasses.replace(header, payload_type=None)  # the edit may change the type byte
    return container.write(header, edit(bytearray(payload)), model.fingerprint)


@pytest.fixture(scope="module")
def pixel_file(pixel):
    return codec.compress(pixel, image(30, 28), steps=6, params=QUICK, reconstruct=True)


def test_pixel_file_decodes_to_the_encoders_sample_bit_for_bit(pixel, pixel_file):
    enc = pixel_file
    assert enc.fields.steps == 6 and len(enc.budgets) == 6 and enc.image.shape == (30, 28, 3)
    parsed = codec.parse(pixel, enc.data)
    assert [lay.budget for lay, _ in parsed.steps] == enc.budgets
    assert torch.equal(codec.decode_sample(pixel, parsed), enc.sample)
    assert np.array_equal(codec.decompress(pixel, enc.data), enc.image)


def test_rate_is_the_model_code_length_plus_fixed_bytes(pixel, pixel_file):
    enc = pixel_file
    geo = codec.geometry(pixel, 30, 28)
    fixed = codec.fixed_bytes(pixel, geo, enc.fields, QUICK)
    stream_bytes = len(enc.data) - fixed
    assert stream_bytes % 4 == 0
    assert enc.code_bits / 8 <= stream_bytes <= enc.code_bits / 8 * 1.02 + 8  # + the coder's last words
    # the step budgets follow the measured KL, and the padding (30x28 in a 32x32 grid) costs nothing
    assert enc.budgets == [math.ceil(k) for k in enc.kl_bits]


def test_latent_and_null_condition_files_round_trip(latent, pixel):
    enc = codec.compress(latent, image(64, 64, 1), steps=5, params=QUICK, reconstruct=True)
    assert enc.fields.conditional
    assert torch.equal(codec.decode_sample(latent, codec.parse(latent, enc.data)), enc.sample)
    base = codec.compress(pixel, image(32, 32, 2), steps=3, conditional=False, params=QUICK, reconstruct=True)
    parsed = codec.parse(pixel, base.data)
    assert not parsed.fields.conditional and parsed.indices is None
    assert torch.equal(codec.decode_sample(pixel, parsed), base.sample)


def test_default_decode_parameters_are_not_stored(pixel):
    enc = codec.compress(pixel, image(32, 32, 3), steps=1)
    header, _, _ = container.read_header(enc.data)
    assert header.params is None and header.payload_type == container.TYPE_DIFFC
    parsed = codec.parse(pixel, enc.data)
    sampler, grid, cfg = codec.denoise_plan(pixel, parsed.fields, None)
    assert sampler == "euler" and len(grid) - 1 == 51 and cfg == pixel.config["sampling"]["cfg"]
    # a seed alone is stored with the default denoise spelled out
    seeded = codec.compress(pixel, image(32, 32, 3), steps=1, seed=9)
    assert container.read_header(seeded.data)[0].params.seed == 9


def test_rate_control_by_target_bpp_and_recon_t(pixel):
    img = image(32, 32, 4)
    full = codec.compress(pixel, img, steps=5)
    sizes = []
    for k in range(1, 6):
        part = codec.compress(pixel, img, steps=k)
        assert part.budgets == full.budgets[:k]  # progressive: a shorter file is a prefix of the chain
        sizes.append(8 * len(part.data) / (32 * 32))
    target = (sizes[2] + sizes[3]) / 2
    by_rate = codec.compress(pixel, img, bpp=target)
    assert len(by_rate.budgets) == 4  # the first step count whose file reaches the target
    with pytest.raises(ValueError, match="exactly one"):
        codec.compress(pixel, img, steps=2, bpp=0.1)
    assert schedule.steps_for_recon_t(972) == 1


def test_mode_zero_and_diffc_decoders_refuse_each_others_files(pixel, pixel_file):
    with pytest.raises(BitstreamError, match="cod diffc decompress"):
        api.parse(pixel, pixel_file.data)
    plain = pixel.compress([image(32, 32)])[0]
    with pytest.raises(BitstreamError, match="not a DiffC file"):
        codec.parse(pixel, plain)
    assert pixel.decompress(plain).shape == (32, 32, 3)  # mode 0 unchanged


def test_malformed_payloads_are_refused(pixel, pixel_file):
    data = pixel_file.data

    def set_byte(i, value):
        def edit(p):
            p[i] = value
            return bytes(p)
        return edit

    cases = {
        "reserved flag": set_byte(1, 0x81),
        "release-parity": set_byte(1, 0xC0),
        "schedule": set_byte(2, 1),
        "chunk parameters": set_byte(3, 0x22),       # M = 3, P = 2: fine; then M <= P below
        "M=2, P=2": set_byte(3, 0x12),
        "K too long": set_byte(4, 161),
        "K not shortest": lambda p: bytes(p[:4] + bytes([0x86, 0x00]) + p[5:]),
        "truncated": lambda p: bytes(p[:-4]),
        "trailing": lambda p: bytes(p) + b"\0\0\0\0",
        "VQ cut": lambda p: bytes(p[:6]),
        "empty": lambda p: bytes(p[:3]),
        "unknown type": set_byte(0, 0x07),
        "indices type": set_byte(0, 0x00),
    }
    for name, edit in cases.items():
        with pytest.raises(BitstreamError):
            codec.parse(pixel, rewrap(pixel, data, edit))
    with pytest.raises(BitstreamError, match="integrity"):
        codec.parse(pixel, data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    with pytest.raises(BitstreamError, match="another model"):
        other = cod.new_model("tiny-pixel")
        other.fingerprint = "00" * 32
        codec.parse(other, data)


def test_typed_payload_types_in_the_container():
    fp = "ab" * 32
    for type_byte, message in ((0x00, "entropy-coded indices, not DiffC"), (0x09, "unknown payload type")):
        data = container.write(Header(8, 8, 0xAB, container.PAYLOAD_TYPED), bytes([type_byte, 1, 2]), fp)
        with pytest.raises(BitstreamError, match=message):
            container.read(data, fp, lambda h, w: 0)
    data = container.write(Header(8, 8, 0xAB, container.PAYLOAD_TYPED), b"\x01abc", fp)
    header, payload = container.read(data, fp, lambda h, w: 0)
    assert header.payload_type == container.TYPE_DIFFC and payload == b"\x01abc"
    with pytest.raises(BitstreamError, match="truncated"):
        container.read(data[:4], fp, lambda h, w: 0)
