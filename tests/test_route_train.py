"""The CPU training route gives the plain route's loss and gradients, and training takes it.

Same seed, same keep-masks: the route changes only the arithmetic. Small networks with
a shifted block, 40x48 images (5 x 6 windows: every window kind), one thread unless
a test is about the workers.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mitdenoise import model as model_module
from mitdenoise import masked_windows, route_train
from mitdenoise.masking import input_mask
from mitdenoise.model import ModelConfig, SwinIR

SMALL = ModelConfig(embed_dim=12, depths=(2, 2), num_heads=(2, 3))


def small_network(ratio, seed: int = 0) -> SwinIR:
    """SMALL with ``ratio``, its position biases spread (a misplaced bias shows)."""
    torch.manual_seed(seed)
    model = SwinIR(dataclasses.replace(SMALL, attn_mask_ratio=ratio))
    with torch.no_grad():
        for block in (b for layer in model.layers for b in layer.residual_group.blocks):
            block.attn.relative_position_bias_table.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return model


def batch(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-masked noisy patches and their targets."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 3, 40, 48, generator=g)
    noisy = (clean + 0.06 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return input_mask(noisy, (80, 90), generator=g), clean


def loss_and_grads(model, x, target, **forward) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = F.l1_loss(model(x, generator=torch.Generator().manual_seed(3), **forward), target)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(grads: dict, reference: dict, tolerance: float = 1e-5) -> None:
    """Every parameter's gradient equals the reference's to ``tolerance`` of its largest entry."""
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (grads[name] - grad).abs().max() / scale < tolerance, name


def count_calls(monkeypatch, name: str) -> list:
    """Record the results of ``route_train.<name>`` (it still runs)."""
    results = []
    original = getattr(route_train, name)

    def spy(*args, **kwargs):
        results.append(result := original(*args, **kwargs))
        return result

    monkeypatch.setattr(route_train, name, spy)
    return results


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ratio", [(75, 75), (50, 90), (0, 0)])
@pytest.mark.parametrize("chunk", [None, 7])
def test_training_route_gives_the_plain_routes_loss_and_every_gradient_to_1e_5(monkeypatch, ratio, chunk):
    """Attention mask on (fixed and drawn ratio) and off, input mask on, shifted blocks with every
    window kind, windows all at once or in chunks of 7 (chunks mixing kinds and kept counts)."""
    monkeypatch.setattr(model_module, "CPU_ATTENTION_CHUNK", chunk)
    groups = count_calls(monkeypatch, "residual_group_forward")
    masked = count_calls(monkeypatch, "masked_query_attention")
    unmasked = count_calls(monkeypatch, "unmasked_attention")
    model = small_network(ratio)
    x, target = batch()
    loss, grads = loss_and_grads(model, x, target)
    assert len(groups) == 2  # both residual groups took the route
    if ratio == (0, 0):
        assert len(unmasked) == 4 * (1 if chunk is None else 13) and not masked
    else:  # every chunk of every block took the masked queries in aggregate
        assert len(masked) == 4 * (1 if chunk is None else 13) and all(out is not None for out in masked)
    plain_loss, plain_grads = loss_and_grads(model, x, target, shortcut=False)
    assert len(groups) == 2  # the plain route does not take it
    assert abs(loss - plain_loss) <= 1e-6 * plain_loss
    assert_same_grads(grads, plain_grads)


@pytest.mark.usefixtures("one_thread")
def test_the_route_steps_aside_where_its_exponentials_could_underflow(monkeypatch):
    """A huge query bias: the masked queries' weights underflow, so those chunks take the plain
    attention; a position bias spreading over 60: the block lists every token. Same numbers."""
    masked = count_calls(monkeypatch, "masked_query_attention")
    model = small_network((75, 75))
    x, target = batch(2)
    with torch.no_grad():
        model.layers[0].residual_group.blocks[1].attn.qkv.bias[:12] = 400.0
        model.layers[0].residual_group.blocks[1].attn.qkv.weight[12:24] *= 50
        model.layers[1].residual_group.blocks[0].attn.relative_position_bias_table[0] = 70.0
    loss, grads = loss_and_grads(model, x, target)
    assert masked.count(None) == 1 and len(masked) == 3  # the spread block never tried
    plain_loss, plain_grads = loss_and_grads(model, x, target, shortcut=False)
    assert torch.isfinite(torch.tensor(loss)) and abs(loss - plain_loss) <= 1e-5 * plain_loss
    assert_same_grads(grads, plain_grads, 1e-4)


@pytest.mark.usefixtures("two_threads")
def test_the_batch_in_parts_on_two_workers_gives_one_forwards_loss_and_gradients():
    """Keep-masks drawn up front for the whole batch: the parts see what one forward sees. Their
    gradients are summed in a fixed order: the same bits whichever worker ends first."""
    model = small_network((75, 75))
    x, target = batch(5)
    plain_loss, plain_grads = loss_and_grads(model, x, target, shortcut=False)
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = route_train.backward_in_parts(model, x, target, F.l1_loss, torch.Generator().manual_seed(3), (75, 75))
        assert loss is not None  # two threads: two workers
        runs.append((loss, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (loss, grads), (again, grads_again) = runs
    assert abs(loss.item() - plain_loss) <= 1e-6 * plain_loss
    assert_same_grads(grads, plain_grads)
    assert torch.equal(loss, again) and all(torch.equal(grads[n], grads_again[n]) for n in grads)


def test_the_batch_stays_whole_without_workers_or_with_one_image(one_thread):
    model = small_network((75, 75))
    x, target = batch(2)
    assert route_train.backward_in_parts(model, x, target, F.l1_loss, None, (75, 75)) is None  # one thread
    torch.set_num_threads(2)
    assert route_train.backward_in_parts(model, x[:1], target[:1], F.l1_loss, None, (75, 75)) is None


def test_the_route_is_taken_on_the_cpu_in_fp32_under_autograd_only(monkeypatch):
    groups = count_calls(monkeypatch, "residual_group_forward")
    model = small_network((75, 75))
    x, _ = batch(1)
    model(x)
    assert len(groups) == 2
    with torch.no_grad():
        model(x)  # inference: the CPU inference route
    model(x, shortcut=False)  # the plain route, on request
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # bf16 autocast: the model's modules
    assert len(groups) == 2
    assert not model_module.train_route_applies(x.double())
    assert not model_module.train_route_applies(torch.zeros(1, device="meta"))


def test_short_row_softmax_has_the_values_and_gradients_of_softmax():
    g = torch.Generator().manual_seed(0)
    for width in (7, 20):
        y = torch.randn(9, width, generator=g, requires_grad=True)
        w = torch.randn(9, width, generator=g)
        fast = masked_windows.softmax(y)
        (fast * w).sum().backward()
        grad, y.grad = y.grad.clone(), None
        (y.softmax(-1) * w).sum().backward()
        assert (fast - y.softmax(-1)).abs().max() < 1e-6 and (grad - y.grad).abs().max() < 1e-6


def test_masked_layouts_gathers_put_every_row_where_it_belongs():
    """``key_sources`` takes each (position, window) row from its listed key or its window's rest row;
    ``sum_sources`` puts the masked and the listed rows at the rows ``masked_rows`` and
    ``listed_rows`` name, and covers every row once."""
    g = torch.Generator().manual_seed(0)
    bw, n, nk, heads = 5, 16, 6, 3
    pos = torch.stack([torch.randperm(n, generator=g) for _ in range(bw)])
    layout = masked_windows.MaskedLayout(pos, torch.zeros(bw, dtype=torch.long), nk, heads, 1)

    rows = torch.arange(bw * (nk + 1))  # the listed keys' rows (bw, nk), then one rest row a window
    keys = rows.index_select(0, layout.key_sources).view(n, bw)
    for w in range(bw):
        for slot in range(n):
            expected = w * nk + slot if slot < nk else bw * nk + w
            assert keys[pos[w, slot], w] == expected

    written = torch.arange(n * bw * heads)  # the masked rows, then the listed rows
    gathered = written.index_select(0, layout.sum_sources)
    placed = torch.full_like(written, -1)
    placed.index_copy_(0, torch.cat([layout.masked_rows, layout.listed_rows]), written)
    assert torch.equal(gathered, placed)
    assert torch.equal(gathered.sort().values, written)
