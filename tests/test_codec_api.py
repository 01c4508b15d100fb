"""The codec's Python API (cod.codec.api, CoDModel.compress/decompress): inputs of every kind and size, batches
equal to single images, stored sampling options, and mutated files only ever refused with a ValueError."""
from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch
from PIL import Image

import cod
from cod.codec import api
from cod.codec.container import BitstreamError
from conftest import ROOT


@pytest.fixture(scope="module")
def model():
    m = cod.new_model("tiny-pixel")
    m.fingerprint = "c4" + "5a" * 31  # an unsaved model has none, and files are keyed by it
    return m


def rand_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_arrays_pil_uint8_and_float_tensors_give_the_same_file(model):
    img = rand_image(33, 65)
    as_float = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    files = model.compress([img, Image.fromarray(img), torch.from_numpy(img).permute(2, 0, 1), as_float,
                            *as_float[None]], steps=2)  # the last one: a [1, 3, H, W] float batch, unpacked
    assert len(set(files)) == 1
    assert model.decompress(files[0]).shape == (33, 65, 3)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        model.compress([np.zeros((4, 4), np.uint8)])


def test_batches_give_the_same_bytes_and_pixels_within_one_level(model):
    # three images of one padded size (64x96) and one of another: two groups, coded out of input order
    images = [rand_image(40, 70, 0), rand_image(20, 20, 1), rand_image(48, 96, 2), rand_image(64, 65, 3)]
    assert api.compress(model, images, batch_size=3, steps=2) == [model.compress([im], steps=2)[0] for im in images]
    single = [model.compress([im], steps=2, seed=i)[0] for i, im in enumerate(images)]  # a seed each
    parsed = [api.parse(model, data) for data in single]
    one_by_one = [model.decompress(data) for data in single]
    decoded = dict(api.iter_decoded(model, parsed, batch_size=3))
    assert sorted(decoded) == [0, 1, 2, 3]
    for i, image in enumerate(one_by_one):  # batched sums may round a rare pixel the other way
        diff = np.abs(decoded[i].astype(int) - image)
        assert image.shape == images[i].shape and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert np.array_equal(model.decompress(single[2]), one_by_one[2])  # alone: always the same pixels


def test_sampling_options_are_stored_only_when_not_the_defaults(model):
    img = rand_image(32, 32)
    plain, chosen = model.compress([img])[0], model.compress([img], steps=3, cfg=1.5, seed=9, sampler="euler")[0]
    assert len(chosen) - len(plain) == 5  # sampler, steps, 2-byte cfg, 1-byte seed
    params = api.parse(model, chosen)[0].params
    assert (params.sampler, params.steps, params.cfg, params.seed) == ("euler", 3, 1.5, 9)
    assert api.decode_options(api.parse(model, chosen)[0], steps=2) == (
        {"sampler": "euler", "steps": 2, "cfg": 1.5}, 9)  # explicit options win over the file's
    assert model.compress([img], steps=model.config["sampling"]["steps"], seed=0) == [plain]
    with pytest.raises(ValueError, match="not reproducible"):
        model.compress([img], sampler="euler_sde")
    with pytest.raises(ValueError, match="official format cannot store"):
        model.compress([img], fmt="official", steps=3)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.compress([rand_image(32, 33)], fmt="official")
    with pytest.raises(ValueError, match="outside what a .cod file holds"):
        model.compress([np.zeros((1, 70000, 3), np.uint8)])


def load_fuzzer():
    """tools/fuzz_bitstream.py (the long fuzz run) supplies the mutations, so both fuzz the same way."""
    spec = importlib.util.spec_from_file_location("fuzz_bitstream", ROOT / "tools" / "fuzz_bitstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzzed_files_are_parsed_or_refused_with_a_value_error(model):
    rng = random.Random(0)
    seeds = [(f, "cod") for f in model.compress([rand_image(1, 1), rand_image(64, 64), rand_image(17, 120)])]
    seeds += [(model.compress([rand_image(17, 120)], steps=2, seed=300, cfg=2.5)[0], "cod"),
              (model.compress([rand_image(64, 32)], fmt="official")[0], "official")]
    accepted = {"cod": [], "official": []}
    refused = 0
    mutate = load_fuzzer().mutate
    for _ in range(3000):
        original, fmt = rng.choice(seeds)
        data = mutate(rng, original)
        try:
            parsed = api.parse(model, data, fmt)
        except ValueError:  # BitstreamError is one; anything else fails the test
            refused += 1
            continue
        if data != original:
            accepted[fmt].append(parsed)
    assert refused > 2500
    assert len(accepted["cod"]) < 25  # the keyed check byte lets ~1 in 256 corruptions of a .cod file through
    # a few of the files that got through decode like any other (official files have no check at all)
    survivors = accepted["cod"][:2] + accepted["official"][:2]
    assert survivors
    for i, image in api.iter_decoded(model, survivors, steps=1):
        assert image.shape == (survivors[i][0].height, survivors[i][0].width, 3)


def test_official_format_round_trip_and_refusals(model):
    img = rand_image(64, 96)
    data = model.compress([img], fmt="official")[0]
    assert data[:4] == bytes([64, 0, 96, 0]) and len(data) == 4 + 6 // 2  # H first, then W; 2x3 4-bit indices
    assert model.decompress(data, fmt="official").shape == (64, 96, 3)
    for bad, message in [(data[:-1], "payload bytes"), (b"\x10\x00\x20\x00" + data[4:], "not a multiple"),
                         (b"\x00", "4-byte header")]:
        with pytest.raises(ValueError, match=message):
            api.parse(model, bad, "official")
    with pytest.raises(BitstreamError, match="try --format official"):
        api.parse(model, data)
