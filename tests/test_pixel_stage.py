"""PixNerDiT's per-pixel stage: the channel-major computation (decode_patches) against the release's pixel-major
layout (decode_patches_reference), forward and backward, and in bf16."""
from __future__ import annotations

import torch

import cod
from conftest import max_rel_err


def _stage_inputs(net, B=2, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(B, n, net.in_channels * net.patch_size ** 2, generator=g)
    cond_tokens = torch.randn(B, n, net.hidden_size, generator=g)
    s = torch.randn(B, n, net.hidden_size, generator=g)
    return patches, cond_tokens, s


def test_channel_major_stage_equals_the_release_layout():
    torch.manual_seed(0)
    net = cod.new_model("tiny-pixel").denoiser.eval()
    inputs = _stage_inputs(net)
    with torch.no_grad():
        lean = net.decode_patches(*inputs)
        reference = net.decode_patches_reference(*inputs)
    assert lean.shape == reference.shape
    assert max_rel_err(lean, reference) < 1e-5  # float rounding only: products of other shapes
    net.reference_pixel_stage = True
    with torch.no_grad():
        assert torch.equal(net.decode_patches(*inputs), reference)


def test_channel_major_stage_gradients_equal_the_release_layout():
    torch.manual_seed(0)
    net = cod.new_model("tiny-pixel").denoiser
    grads = []
    for stage in (net.decode_patches, net.decode_patches_reference):
        net.zero_grad()
        inputs = [t.requires_grad_() for t in _stage_inputs(net)]
        stage(*inputs).square().sum().backward()
        block = net.blocks[net.num_cond_blocks]
        grads.append([t.grad for t in inputs] + [block.param_generator1[0].weight.grad,
                                                  net.x_embedder.embedder[0].weight.grad])
    for lean, reference in zip(*grads):
        assert max_rel_err(lean, reference) < 1e-4


def test_channel_major_stage_in_bf16():
    """bf16 rounds in other places in the two layouts; both stay as close to float32 as each other."""
    torch.manual_seed(0)
    model = cod.new_model("tiny-pixel")
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        cond = model.codec(torch.rand(2, 3, 64, 64))[0]
        fp32, _ = model.denoiser(x, t, cond=cond)
        model.set_precision("bf16")
        lean, _ = model.denoiser(x, t, cond=cond)
        model.denoiser.reference_pixel_stage = True
        reference, _ = model.denoiser(x, t, cond=cond)
    assert lean.dtype == torch.float32
    # measured 0.042 (channel-major) and 0.038 (release layout) relative to float32
    assert max_rel_err(lean, fp32) < 0.08 and max_rel_err(lean, fp32) < 1.5 * max_rel_err(reference, fp32)
