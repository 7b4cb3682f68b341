"""The one-kernel Swin block (mitdenoise/triton_block.py) against the plain block.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set in a
subprocess so that it never reaches a GPU run of the suite) with fp32 products; on a
GPU, compiled, inside the whole network under bf16 autocast.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import subprocess_env

INTERPRETED = r"""
import json, sys
import torch
from mitdenoise import triton_block
from mitdenoise.model import ForwardContext, Route, SwinTransformerBlock

def given_keep(keep):
    # the plain route, with keep as every block's attention keep-mask
    def draw(shape, ratio, generator, device):
        assert keep is None or keep.shape == shape
        return keep
    return ForwardContext(Route.PLAIN, (75, 75) if keep is not None else (0, 0), draw_mask=draw)

def max_error(block, x, size, keep):
    with torch.no_grad():
        plain = block(x, size, given_keep(keep))
        kernel = triton_block.block_forward(block, x, size, keep, torch.float32)
    return float((kernel - plain).abs().max() / plain.abs().max())

torch.manual_seed(0)
results = []
for dim, heads, shift, masked in json.loads(sys.argv[1]):
    block = SwinTransformerBlock(dim, heads, 8, shift, 2.0).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    b, h, w = 2, 24, 40
    x = torch.randn(b, h * w, dim)
    keep = (torch.rand(b * (h // 8) * (w // 8), 64, 1) >= 0.75).float() if masked else None
    error = max_error(block, x, (h, w), keep)
    # new weights loaded into the same block: the cached packed weights must follow
    state = {k: v + 0.05 for k, v in block.state_dict().items() if v.is_floating_point()}
    block.load_state_dict(state, strict=False)
    results.append([error, max_error(block, x, (h, w), keep)])
print(json.dumps(results))
"""

CASES = [(12, 2, 0, False), (12, 2, 4, True), (48, 6, 4, False), (48, 6, 0, True), (60, 6, 4, True), (60, 6, 0, False)]


@pytest.mark.slow
def test_one_kernel_block_equals_the_plain_block_in_the_triton_interpreter():
    """Every shape of ours and the authors' (head size 2 to 10, shifted or not, keep-mask or not)
    within 1e-5 of the plain block's largest value, also after new weights are loaded."""
    pytest.importorskip("triton", reason="Triton is in the test extras: pip install -e '.[test]'")
    env = subprocess_env(TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED, json.dumps(CASES)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    for case, errors in zip(CASES, results):
        assert max(errors) < 1e-5, (case, errors)


def test_the_kernel_takes_only_window_8_and_register_sized_shapes():
    from mitdenoise import triton_block

    assert triton_block.supports(60, 6, 120, 8) and triton_block.supports(48, 6, 96, 8)
    assert not triton_block.supports(60, 6, 120, 7)
    assert not triton_block.supports(180, 6, 360, 8)  # SwinIR's large denoiser: too many registers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ratio", [(0, 0), (75, 75)])
def test_kernel_route_on_cuda_is_as_close_to_fp32_as_the_fused_route(fixtures_dir, monkeypatch, ratio):
    """bf16 autocast on a GPU: the network with one kernel per block against the same with the
    fused attention route, both against fp32. Same mask draws (same generator seed)."""
    from mitdenoise import triton_block
    from mitdenoise.checkpoints import load_model

    model = load_model(fixtures_dir / "official_tiny_random.pth", attn_mask_ratio=ratio).cuda()
    x = torch.rand(2, 3, 72, 88, generator=torch.Generator().manual_seed(0)).cuda()

    def run(**autocast):
        with torch.inference_mode(), torch.autocast("cuda", **autocast):
            return model(x, generator=torch.Generator("cuda").manual_seed(3)).float()

    exact = run(enabled=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert triton_block.autocast_dtype(model.config, x.device) == torch.bfloat16
    kernel = run(dtype=torch.bfloat16)
    assert triton_block._failed is None  # it ran, and did not fall back
    monkeypatch.setattr(triton_block, "autocast_dtype", lambda config, device: None)
    fused = run(dtype=torch.bfloat16)
    kernel_error, fused_error = (kernel - exact).abs().mean(), (fused - exact).abs().mean()
    assert torch.isfinite(kernel).all() and kernel_error < 1.5 * fused_error + 1e-4, (kernel_error, fused_error)
    assert (kernel - fused).abs().mean() < 5e-3


def test_where_the_kernel_cannot_run_the_block_warns_once_and_takes_the_other_route(monkeypatch):
    """Here the kernel gets CPU tensors outside the interpreter, which Triton refuses, as it would
    refuse a GPU it can't compile for: the block's output is the fused route's, with one warning,
    and the next block does not try the kernel again."""
    pytest.importorskip("triton", reason="Triton is in the test extras: pip install -e '.[test]'")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs on CPU tensors")
    from mitdenoise import triton_block
    from mitdenoise.model import ForwardContext, Route, SwinTransformerBlock

    monkeypatch.setattr(triton_block, "_failed", None)
    torch.manual_seed(0)
    block = SwinTransformerBlock(12, 2, 8, 4, 2.0).eval()
    x = torch.randn(1, 16 * 24, 12)
    with torch.no_grad():
        plain = block(x, (16, 24), ForwardContext(Route.PLAIN, (0, 0)))
        fused = block(x, (16, 24), ForwardContext(Route.FUSED, (0, 0)))
        ctx = ForwardContext(Route.TRITON, (0, 0), dtype=torch.float32)
        with pytest.warns(RuntimeWarning, match="one-kernel Swin block cannot run here"):
            out = block(x, (16, 24), ctx)
        assert triton_block._failed and not triton_block.available()
        assert torch.equal(out, fused) and (out - plain).abs().max() < 1e-5
        launched = []
        monkeypatch.setattr(triton_block, "_packed", lambda *args: launched.append(args))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, no second try
            again = block(x, (16, 24), ctx)
        assert launched == [] and torch.equal(again, fused) and ctx.route is Route.TRITON
