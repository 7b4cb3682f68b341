"""The network matches the authors' implementation and draws its attention mask as specified."""

import pytest
import torch
from safetensors.torch import load_file

from mitdenoise import model as model_module
from mitdenoise import route_cpu
from mitdenoise.masking import draw_keep_mask
from mitdenoise.model import ModelConfig, SwinIR, config_from_state_dict
from mitdenoise.windows import shift_mask
from mitdenoise.checkpoints import load_model

CONFIGS = {
    "full": ModelConfig(attn_mask_ratio=(0, 0)),
    "tiny": ModelConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 2), attn_mask_ratio=(0, 0)),
    "tiny1conv": ModelConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 2), resi_connection="1conv", attn_mask_ratio=(0, 0)),
}
CHECKPOINTS = [("full", "pth"), ("tiny", "pth"), ("tiny", "safetensors"), ("tiny1conv", "pth")]


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.mark.parametrize("name,ext", CHECKPOINTS)
def test_loads_authors_checkpoint_and_matches_their_outputs_to_1e_5(fixtures_dir, name, ext):
    model = load_model(fixtures_dir / f"official_{name}_random.{ext}", attn_mask_ratio=(0, 0))
    assert model.config == CONFIGS[name]
    io = load_file(str(fixtures_dir / f"official_{name}_io.safetensors"))
    with torch.no_grad():
        for key in ("", "64", "_odd", "_b2"):
            out = model(io["input" + key])
            assert out.shape == io["output" + key].shape
            diff = (out - io["output" + key]).abs().max().item()
            assert diff <= 1e-5, f"{name}.{ext} input{key}: max |diff| {diff:.2e}"


def test_config_read_from_shapes_matches_the_authors_released_model(fixtures_dir):
    state = torch.load(fixtures_dir / "official_full_random.pth", weights_only=True)
    config = config_from_state_dict(state)
    assert config == ModelConfig()  # 1x1 conv_first: masked model, no global residual, mask 75 %
    assert config.attn_mask_ratio == (75, 75) and not config.global_residual


def test_stored_shift_masks_are_the_ones_we_compute_for_64x64(fixtures_dir):
    state = torch.load(fixtures_dir / "official_full_random.pth", weights_only=True)
    stored = state["layers.0.residual_group.blocks.1.attn_mask"]
    assert torch.equal(shift_mask(64, 64, 8, 4), stored)


def test_original_swinir_wiring_adds_both_residuals():
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=12, depths=(1,), num_heads=(2,), conv_first_kernel=3, global_residual=True,
                         resi_connection="1conv", attn_mask_ratio=(0, 0))
    model = SwinIR(config).eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        # all weights zero: body and convs give 0, so the output is the input itself
        assert torch.allclose(model(x), x, atol=1e-6)
        masked = SwinIR(ModelConfig(embed_dim=12, depths=(1,), num_heads=(2,), attn_mask_ratio=(0, 0))).eval()
        for p in masked.parameters():
            torch.nn.init.zeros_(p)
        # masked-training wiring has no residual: zero weights give the mean colour
        assert torch.allclose(masked(x), masked.mean.expand_as(x), atol=1e-6)
    # state dict of the original wiring is read back as such
    assert config_from_state_dict(model.state_dict()) == ModelConfig(
        embed_dim=12, depths=(1,), num_heads=(2,), conv_first_kernel=3, global_residual=True,
        resi_connection="1conv", attn_mask_ratio=(0, 0))


def test_attention_mask_zeroes_the_stated_fraction_on_the_device_reproducibly():
    g = torch.Generator().manual_seed(3)
    keep = draw_keep_mask((4000, 64, 1), (75, 75), g, torch.device("cpu"))
    assert keep.shape == (4000, 64, 1)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(keep.mean().item() - 0.25) < 0.005
    g.manual_seed(3)
    assert torch.equal(keep, draw_keep_mask((4000, 64, 1), (75, 75), g, torch.device("cpu")))
    assert draw_keep_mask((4, 64, 1), (0, 0), g, torch.device("cpu")) is None


def test_mask_ratio_range_is_drawn_per_call():
    g = torch.Generator().manual_seed(0)
    means = {round(draw_keep_mask((2000, 64, 1), (60, 90), g, torch.device("cpu")).mean().item(), 2) for _ in range(20)}
    assert min(means) >= 0.08 and max(means) <= 0.42 and len(means) > 5


def test_mask_on_at_inference_seeded_outputs_repeat_and_differ_across_seeds(fixtures_dir):
    model = load_model(fixtures_dir / "official_tiny_random.pth")
    assert model.config.attn_mask_ratio == (75, 75)
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(x, generator=torch.Generator().manual_seed(1))
        b = model(x, generator=torch.Generator().manual_seed(1))
        c = model(x, generator=torch.Generator().manual_seed(2))
        off = load_model(fixtures_dir / "official_tiny_random.pth", attn_mask_ratio=(0, 0))(x)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (a - off).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [dict(depths=(2,), num_heads=(2, 2)), dict(resi_connection="2conv"),
                                 dict(attn_mask_ratio=(80, 70)), dict(embed_dim=13, num_heads=(2,), depths=(2,))])
def test_config_rejects_inconsistent_values(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_config_round_trips_through_json():
    config = ModelConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 2), attn_mask_ratio=(70, 80))
    assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("h,w", [(64, 64), (40, 56), (16, 8)])
def test_edge_shift_mask_equals_the_full_shift_mask(h, w):
    from mitdenoise.windows import EdgeShiftMask

    full = shift_mask(h, w, 8, 4)
    n_windows = full.shape[0]
    scores = torch.zeros(2 * n_windows, 3, 64, 64)
    EdgeShiftMask(h, w, 8, 4).add_to(scores.view(2, h // 8, w // 8, 3, 64, 64), (0, h // 8))
    assert torch.equal(scores.view(2, n_windows, 3, 64, 64), full[None, :, None].expand(2, -1, 3, -1, -1))


@pytest.mark.parametrize("chunk", [1, 5, 12, 30])
def test_attention_in_chunks_equals_one_call(fixtures_dir, monkeypatch, chunk):
    model = load_model(fixtures_dir / "official_tiny_random.pth")
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))  # 5 x 6 = 30 windows per image
    with torch.no_grad():
        monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", None)
        whole = model(x, generator=torch.Generator().manual_seed(4))
        monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", chunk)
        chunked = model(x, generator=torch.Generator().manual_seed(4))
    assert (whole - chunked).abs().max() < 1e-5


def test_window_order_gathers_what_roll_and_partition_give():
    from mitdenoise.windows import window_order, window_partition

    x = torch.rand(2, 24, 40, 5, generator=torch.Generator().manual_seed(0))
    for shift in (0, 4):
        expected = window_partition(torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)), 8).reshape(-1, 5)
        assert torch.equal(x.reshape(-1, 5)[window_order(2, 24, 40, 8, shift)], expected)


@pytest.mark.parametrize("ratio", [(75, 75), (50, 90), (10, 10)])
@pytest.mark.parametrize("chunk", [None, 4, 128])
@pytest.mark.parametrize("onednn", [True, False])
def test_masked_token_shortcut_equals_the_plain_attention(fixtures_dir, monkeypatch, ratio, chunk, onednn):
    """Same seed, same keep-masks: the shortcut changes only the arithmetic (to 1e-5),
    on every window kind of the shifted blocks (40x48: 5x6 windows) and across images,
    with its linears through oneDNN or through ``F.linear`` (where torch lacks oneDNN)."""
    monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", chunk)
    monkeypatch.setattr(route_cpu, "ONEDNN_LINEAR", onednn and route_cpu.ONEDNN_LINEAR)
    model = load_model(fixtures_dir / "official_tiny_random.pth", attn_mask_ratio=ratio)
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    calls = []
    original = route_cpu.masked_attention
    monkeypatch.setattr(
        route_cpu, "masked_attention", lambda *a: calls.append(1) or original(*a)
    )
    with torch.inference_mode():
        fast = model(x, generator=torch.Generator().manual_seed(3))
        plain = model(x, generator=torch.Generator().manual_seed(3), shortcut=False)
    assert len(calls) >= 4  # the shortcut was taken, in every block
    assert (fast - plain).abs().max() < 1e-5


def test_masked_token_shortcut_is_used_for_the_full_network(fixtures_dir, monkeypatch):
    model = load_model(fixtures_dir / "official_full_random.pth")
    x = torch.rand(1, 3, 48, 56, generator=torch.Generator().manual_seed(0))
    calls = []
    original = route_cpu.masked_query_attention
    monkeypatch.setattr(
        route_cpu, "masked_query_attention", lambda *a: (result := original(*a), calls.append(result is not None))[0]
    )
    with torch.inference_mode():
        fast = model(x, generator=torch.Generator().manual_seed(3))
        plain = model(x, generator=torch.Generator().manual_seed(3), shortcut=False)
    assert calls == [True] * 24  # every block of the 4 x 6 took the shortcut, none fell back
    assert (fast - plain).abs().max() < 1e-5


def test_masked_token_shortcut_steps_aside_where_its_weights_would_underflow(fixtures_dir, monkeypatch):
    """A huge query bias makes exp(c_j - max c) underflow for a whole shift region: the block
    must fall back to the plain attention, not return NaN; a position bias spanning > 60 must
    list every token (no rest key) without trying."""
    from mitdenoise import masked_windows

    calls = []
    original = route_cpu.masked_query_attention
    monkeypatch.setattr(
        route_cpu, "masked_query_attention", lambda *a: (result := original(*a), calls.append(result is not None))[0]
    )
    model = load_model(fixtures_dir / "official_tiny_random.pth")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    attn = model.layers[0].residual_group.blocks[1].attn  # a shifted block
    with torch.no_grad():
        attn.qkv.bias[:12] = 400.0
        attn.qkv.weight[12:24] *= 50
    with torch.inference_mode():
        fast = model(x, generator=torch.Generator().manual_seed(3))
        plain = model(x, generator=torch.Generator().manual_seed(3), shortcut=False)
    assert torch.isfinite(fast).all()
    assert (fast - plain).abs().max() < 1e-4
    blocks = sum(model.config.depths)
    assert len(calls) == blocks and calls.count(False) == 1  # that block fell back, the others did not

    calls.clear()
    model = load_model(fixtures_dir / "official_tiny_random.pth")
    attn = model.layers[0].residual_group.blocks[1].attn
    attn.relative_position_bias_table.data[0] = 70.0
    assert not masked_windows.rest_key_applies(attn)
    with torch.inference_mode():
        fast = model(x, generator=torch.Generator().manual_seed(3))
        plain = model(x, generator=torch.Generator().manual_seed(3), shortcut=False)
    assert (fast - plain).abs().max() < 1e-4
    assert calls == [True] * (blocks - 1)  # that block never tried


def test_the_shortcut_follows_weights_changed_between_calls(fixtures_dir):
    """Nothing of a position bias is kept from call to call: a changed bias table takes effect."""
    model = load_model(fixtures_dir / "official_tiny_random.pth")
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for block in model.layers[0].residual_group.blocks:
            block.attn.relative_position_bias_table.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fast = model(x, generator=torch.Generator().manual_seed(3))
        plain = model(x, generator=torch.Generator().manual_seed(3), shortcut=False)
    assert (fast - plain).abs().max() < 1e-5


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("onednn", [True, False])
def test_gathered_route_without_a_mask_equals_the_plain_route(fixtures_dir, monkeypatch, chunk, onednn):
    """Mask ratio 0 (the baseline): no keep-mask, so every block takes unmasked_attention, whose
    windows come sorted by kind; chunks of 7 windows of the 2 x 5 x 6 mix kinds within a chunk."""
    monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", chunk)
    monkeypatch.setattr(route_cpu, "ONEDNN_LINEAR", onednn and route_cpu.ONEDNN_LINEAR)
    kinds_seen = []
    original = route_cpu.unmasked_attention

    def spy(attn, x, bias, kinds, norm, dtype):
        kinds_seen.append(kinds.tolist())
        return original(attn, x, bias, kinds, norm, dtype)

    monkeypatch.setattr(route_cpu, "unmasked_attention", spy)
    model = load_model(fixtures_dir / "official_tiny_random.pth", attn_mask_ratio=(0, 0))
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast = model(x)
        calls = len(kinds_seen)
        plain = model(x, shortcut=False)
    blocks = sum(len(layer.residual_group.blocks) for layer in model.layers)
    assert calls == blocks * (1 if chunk is None else -(-60 // chunk))
    assert len(kinds_seen) == calls  # the plain route does not take it
    assert all(k == sorted(k) for k in kinds_seen) and any(len(set(k)) > 1 for k in kinds_seen)
    assert {0, 1, 2, 3} <= {kind for k in kinds_seen for kind in k}
    assert (fast - plain).abs().max() < 1e-5


def force_fused_attention(monkeypatch, force: dict) -> None:
    """While ``force["on"]``, every forward takes the CUDA route's fused attention, on any device;
    otherwise the plain route (not the CPU training route)."""
    route = model_module.Route

    def choose(x, config, shortcut=True):
        return (route.FUSED if force["on"] else route.PLAIN), torch.float32

    monkeypatch.setattr(model_module, "choose_route", choose)


@pytest.mark.parametrize("chunk", [None, 4, 12, 30])
@pytest.mark.parametrize("ratio", [(75, 75), (0, 0)])
def test_fused_attention_equals_the_plain_route_in_values_and_gradients(fixtures_dir, monkeypatch, chunk, ratio):
    """The CUDA route (``scaled_dot_product_attention``, masked edge windows redone) gives the
    plain route's outputs and parameter gradients to 1e-5, over every window kind of the shifted
    blocks (40x48: 5x6 windows), several images, and chunks of window rows or of whole images
    (the chunking the fused route takes above FUSED_WINDOWS)."""
    monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", chunk)
    force = {"on": False}
    force_fused_attention(monkeypatch, force)
    model = load_model(fixtures_dir / "official_tiny_random.pth", attn_mask_ratio=ratio)
    with torch.no_grad():  # a position bias with some spread, so a misplaced bias shows
        for block in (b for layer in model.layers for b in layer.residual_group.blocks):
            block.attn.relative_position_bias_table.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    target = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    results = {}
    for on in (False, True):
        force["on"] = on
        model.zero_grad()
        out = model(x, generator=torch.Generator().manual_seed(3))
        (out - target).abs().mean().backward()
        results[on] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (plain, plain_grads), (fused, fused_grads) = results[False], results[True]
    assert (fused - plain).abs().max() < 1e-5
    for name, grad in plain_grads.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (fused_grads[name] - grad).abs().max() / scale < 1e-4, name
    force["on"] = True
    with torch.inference_mode():
        assert (model(x, generator=torch.Generator().manual_seed(3)) - plain).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_attention_on_cuda_equals_the_plain_route(fixtures_dir):
    """On CUDA the fused route is the default: fp32 outputs within 1e-4 of the plain route."""
    model = load_model(fixtures_dir / "official_tiny_random.pth").cuda()
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        fused = model(x, generator=torch.Generator("cuda").manual_seed(3))
        plain = model(x, generator=torch.Generator("cuda").manual_seed(3), shortcut=False)
    assert (fused - plain).abs().max() < 1e-4


def test_fused_route_chunks_windows_under_the_cuda_grid_limit():
    from mitdenoise.model import CPU_ATTENTION_CHUNK, attention_chunk
    from mitdenoise.route_fused import FUSED_WINDOWS
    from mitdenoise.windows import window_chunks

    assert attention_chunk("cuda", fused=True) == FUSED_WINDOWS < 65536
    assert attention_chunk("cuda", fused=False) is None and attention_chunk("cpu", False) == CPU_ATTENTION_CHUNK
    # A batch of four 1024x1024 tiles (65,536 windows) goes through in calls of 32,768 at most.
    chunks = window_chunks(4, 128, 128, FUSED_WINDOWS)
    sizes = [(stop - first) * (row_stop - row_first) * 128 for first, stop, row_first, row_stop in chunks]
    assert sum(sizes) == 65536 and max(sizes) <= FUSED_WINDOWS


def test_edge_windows_of_a_shifted_block_are_those_the_shift_mask_touches():
    from mitdenoise.windows import EdgeShiftMask, shift_mask

    full = shift_mask(40, 48, 8, 4).view(30, 64, 64)  # 5x6 windows
    touched = (full != 0).flatten(1).any(1).nonzero().flatten()
    edges = EdgeShiftMask(40, 48, 8, 4)
    index, masks = edges.edges((0, 5))
    assert index.tolist() == touched.tolist() == [5, 11, 17, 23, 24, 25, 26, 27, 28, 29]
    assert torch.equal(masks[:, 0], full[index])
    index, masks = edges.edges((1, 3))  # rows 1-2 of windows: their last column only, counted from row 1
    assert index.tolist() == [5, 11]
    assert torch.equal(masks[:, 0], full[[11, 17]])


def test_inverse_permutation():
    from mitdenoise.windows import inverse_permutation

    index = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    inverse = inverse_permutation(index)
    assert torch.equal(inverse[index], torch.arange(50))
    assert torch.equal(index[inverse], torch.arange(50))


def test_chunks_on_parallel_workers_give_the_serial_result_bit_for_bit(fixtures_dir, monkeypatch):
    model = load_model(fixtures_dir / "official_tiny_random.pth")
    x = torch.rand(2, 3, 64, 72, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", 8)
    with torch.inference_mode():
        assert route_cpu.chunk_workers() is not None  # the test process runs two threads
        parallel = model(x, generator=torch.Generator().manual_seed(5))
        monkeypatch.setattr(route_cpu, "chunk_workers", lambda: None)
        serial = model(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(parallel, serial)
    with torch.no_grad():  # the caller's autograd mode carries over to the workers
        monkeypatch.undo()
        monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", 8)
        assert torch.equal(model(x, generator=torch.Generator().manual_seed(5)), serial)


def test_no_chunk_workers_under_torch_distributed(tmp_path):
    import torch.distributed as dist

    assert route_cpu.chunk_workers() is not None  # two threads here
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert route_cpu.chunk_workers() is None
    finally:
        dist.destroy_process_group()


def test_x86_builds_of_torch_take_the_onednn_linear():
    """The CPU route's linears go through oneDNN on x86 (CI's build), so the tests above run it."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"oneDNN's linear is only expected on x86 builds of torch (this is {platform.machine()})")
    assert route_cpu.ONEDNN_LINEAR


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("rows,cols,out", [(2048, 60, 120), (64, 64, 1536), (7, 13, 5)])
def test_cpu_linear_equals_linear_then_gelu(monkeypatch, onednn, gelu, rows, cols, out):
    monkeypatch.setattr(route_cpu, "ONEDNN_LINEAR", onednn and route_cpu.ONEDNN_LINEAR)
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(rows, cols, generator=g), torch.randn(out, cols, generator=g), torch.randn(out, generator=g)
    for b in (bias, None):
        expected = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
        if gelu:
            expected = torch.nn.functional.gelu(expected)
        got = route_cpu.cpu_linear(x, weight, b, gelu=gelu)
        assert got.dtype == torch.float32 and got.shape == (rows, out)
        assert (got.double() - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("gelu", [True, False])
def test_bf16_linear_multiplies_bf16_values_and_follows_weight_changes(monkeypatch, onednn, gelu):
    monkeypatch.setattr(route_cpu, "ONEDNN_LINEAR", onednn and route_cpu.ONEDNN_LINEAR)
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(60, 120)
    x = torch.randn(300, 60, generator=g)

    def expected():  # bf16-rounded operands, exact products and sums
        y = torch.nn.functional.linear(
            x.bfloat16().double(), layer.weight.bfloat16().double(), layer.bias.bfloat16().double()
        )
        return torch.nn.functional.gelu(y) if gelu else y

    for _ in range(2):
        got = route_cpu.linear(x, layer, torch.bfloat16, gelu=gelu)
        want = expected()
        assert got.dtype == torch.bfloat16 and got.shape == (300, 120)
        assert (got.double() - want).abs().max() <= 2**-7 * want.abs().max()  # the result's own bf16 rounding
        with torch.no_grad():
            layer.weight.mul_(-2.0)  # in place: the cached bf16 weights must follow
    assert (route_cpu.linear(x, layer, torch.float32, gelu=gelu).double() - expected()).abs().max() > 1e-4


@pytest.mark.parametrize("ratio", [(0, 0), (75, 75)])
def test_bf16_cpu_route_is_close_to_fp32_and_keeps_a_float32_result(fixtures_dir, ratio):
    """bf16 products in the route's linears (masked and unmasked attention, MLP): the output
    moves by bf16 rounding, not more, and comes back in float32."""
    model = load_model(fixtures_dir / "official_tiny_random.pth", attn_mask_ratio=ratio)
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fp32 = model(x, generator=torch.Generator().manual_seed(1))
        bf16 = model(x, generator=torch.Generator().manual_seed(1), matmul_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    diff = (bf16 - fp32).abs()
    assert 1e-4 < diff.max() < 0.05 and diff.mean() < 0.005


def test_the_route_chosen_can_do_what_the_forward_asks(fixtures_dir):
    """choose_route and ROUTES agree: the route taken lists the device, the products' type and,
    under autograd, differentiation."""
    config = load_model(fixtures_dir / "official_tiny_random.pth").config
    cases = [
        (torch.zeros(1, 3, 8, 8), False, model_module.Route.CPU),
        (torch.zeros(1, 3, 8, 8), True, model_module.Route.CPU_TRAINING),
        (torch.zeros(1, 3, 8, 8).double(), True, model_module.Route.PLAIN),
    ]
    if torch.cuda.is_available():
        cases += [(torch.zeros(1, 3, 8, 8, device="cuda"), False, model_module.Route.FUSED)]
    for x, grad, expected in cases:
        with torch.set_grad_enabled(grad):
            route, dtype = model_module.choose_route(x, config)
        capabilities = model_module.ROUTES[route]
        assert route is expected and x.device.type in capabilities.devices and dtype in capabilities.products
        assert capabilities.autograd or not grad
    assert model_module.choose_route(torch.zeros(1), config, shortcut=False)[0] is model_module.Route.PLAIN
    assert set(model_module.ROUTES) == set(model_module.Route)


def test_bf16_products_are_for_the_cpu_inference_route_only(fixtures_dir):
    model = load_model(fixtures_dir / "official_tiny_random.pth")
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="matmul_dtype=torch.bfloat16 is for the CPU inference route only"):
        model(x, matmul_dtype=torch.bfloat16)  # under autograd: the training route
    with torch.inference_mode(), pytest.raises(ValueError, match="for the CPU inference route only"):
        model(x, shortcut=False, matmul_dtype=torch.bfloat16)


@pytest.mark.parametrize("width", [1, 5, 15, 16, 29])
def test_the_shared_softmax_equals_softmax(width):
    from mitdenoise.masked_windows import softmax

    scores = torch.randn(3, 7, width, generator=torch.Generator().manual_seed(width)) * 30 + 500
    expected = scores.double().softmax(-1)
    got = softmax(scores)
    assert (got.double() - expected).abs().max() < 1e-6
    assert torch.allclose(got.sum(-1), torch.ones(3, 7))


def test_token_layer_norm_equals_torch_layer_norm_in_values_and_gradients():
    from mitdenoise.model import token_layer_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(500, 60, generator=g) * 3 + 1).requires_grad_()
    weight = torch.randn(60, generator=g).requires_grad_()
    bias = torch.randn(60, generator=g).requires_grad_()
    ours = token_layer_norm(x, weight, bias, 1e-5)
    theirs = torch.nn.functional.layer_norm(x, (60,), weight, bias, 1e-5)
    assert (ours - theirs).abs().max() < 1e-5
    grads = torch.autograd.grad(ours.square().sum(), (x, weight, bias))
    expected = torch.autograd.grad(theirs.square().sum(), (x, weight, bias))
    for a, b in zip(grads, expected):
        assert (a - b).abs().max() / b.abs().max() < 1e-5
    assert token_layer_norm(x.detach().bfloat16(), weight, bias, 1e-5).dtype == torch.float32  # as autocast's layer_norm
