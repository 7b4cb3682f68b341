"""The network: SwinIR as the masked-training paper uses it, with the attention mask.

State-dict names are those of the authors' (and the original SwinIR) code, so their
checkpoints load as they are. The one addition is the attention keep-mask: inside
every window attention the input tokens are zeroed at random with probability
``r`` (75 % for the released model), at training and at inference alike.

The modules here compute the authors' formulation (the plain route). Faster routes
to the same numbers are functions over these modules: for inference
:mod:`mitdenoise.route_cpu` on the CPU, :mod:`mitdenoise.route_fused` on CUDA,
:mod:`mitdenoise.triton_block` on CUDA under bf16/fp16 autocast; for training on the
CPU in fp32 :mod:`mitdenoise.route_train`. :meth:`SwinIR.forward` picks one.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import route_cpu, route_fused, route_train
from .checks import is_int
from .masking import draw_keep_mask
from .windows import EdgeShiftMask, relative_position_index, window_chunks, window_partition, window_reverse

RGB_MEAN = (0.4488, 0.4371, 0.4040)
CPU_ATTENTION_CHUNK = 128
"""Windows a block takes at a time on the CPU (every route): a chunk's attention scores stay in cache."""
LAYOUT_CACHE_ENTRIES = 32
"""Shift masks and window orders kept per network (two per image size seen)."""

KeepMaskDrawer = Callable[[tuple, tuple, "torch.Generator | None", torch.device], "torch.Tensor | None"]
"""``(shape, ratio_range, generator, device) -> keep-mask or None``, as :func:`~mitdenoise.masking.draw_keep_mask`."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the network; written into checkpoint metadata.

    ``global_residual`` selects the wiring: False is the masked-training model (no
    residual around the body or the whole network); True is the original SwinIR
    denoiser (``+ conv_first(x)`` after the body and ``+ x`` at the end).
    ``attn_mask_ratio`` is the (low, high) percentage range of tokens zeroed in every
    attention layer; a ratio is drawn uniformly from it on each call. (0, 0) is off.
    """

    in_chans: int = 3
    embed_dim: int = 60
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    resi_connection: str = "3conv"
    conv_first_kernel: int = 1
    global_residual: bool = False
    attn_mask_ratio: tuple[int, int] = (75, 75)

    def __post_init__(self) -> None:
        # settings come from TOML, JSON metadata and flags: wrong types are a message, not a crash later
        for name in ("in_chans", "embed_dim", "window_size", "conv_first_kernel"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        for name, length in (("depths", None), ("num_heads", None), ("attn_mask_ratio", 2)):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(is_int(v) for v in value) or not value:
                raise ValueError(f"{name} must be a list of integers, not {value!r}")
            if length is not None and len(value) != length:
                raise ValueError(f"{name} must be [low, high], not {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        if any(v < 1 for v in self.depths + self.num_heads):
            raise ValueError("depths and num_heads must be positive")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number, not {self.mlp_ratio!r}")
        if not isinstance(self.global_residual, bool):
            raise ValueError(f"global_residual must be true or false, not {self.global_residual!r}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError("depths and num_heads must have the same length")
        if self.resi_connection not in ("1conv", "3conv"):
            raise ValueError(f"resi_connection must be '1conv' or '3conv', not {self.resi_connection!r}")
        if any(self.embed_dim % h for h in self.num_heads):
            raise ValueError("embed_dim must be divisible by every num_heads entry")
        low, high = self.attn_mask_ratio
        if not 0 <= low <= high < 100:
            raise ValueError(f"attn_mask_ratio must satisfy 0 <= low <= high < 100, not {self.attn_mask_ratio}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    @property
    def mask_enabled(self) -> bool:
        return self.attn_mask_ratio[1] > 0




def token_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim in fp32, as a mean-variance reduction and two passes."""
    x = x.float()
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    return torch.addcmul(bias, (x - mean) * torch.rsqrt(var + eps), weight)


class TokenNorm(nn.LayerNorm):
    """LayerNorm of each token's channels; in CUDA inference through :func:`token_layer_norm`.

    torch's CUDA LayerNorm is slow on 60-channel tokens; one reduction and two passes
    make the whole forward faster. Training keeps torch's, whose backward is faster.
    The CUDA speed reference gets this norm too (norms see no forward context), which
    can only make the reference faster.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or torch.is_grad_enabled():
            return super().forward(x)
        return token_layer_norm(x, self.weight, self.bias, self.eps)


class Mlp(nn.Module):
    """Token-wise feed-forward: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside 8x8 windows with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor | None, mask: EdgeShiftMask | None, rows: tuple[int, int]
    ) -> torch.Tensor:
        """Attention over whole window rows ``rows`` of one or more images.

        x: (images * rows * nWw, N, C) windows; keep: the same with C = 1, the token
        keep-mask; mask: the shift mask of a shifted block.
        """
        scores, v = self.scores(x, keep)
        scores += self.position_bias().unsqueeze(0)
        if mask is not None:
            n_cols = mask.grid[1]
            mask.add_to(scores.view(-1, rows[1] - rows[0], n_cols, self.num_heads, *scores.shape[-2:]), rows)
        return self.mix(scores, v)

    def scores(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled query-key products (windows, heads, N, N) of the kept tokens, and the values."""
        if keep is not None:
            x = x * keep
        bn, n, c = x.shape
        qkv = self.qkv(x).reshape(bn, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return (q * self.scale) @ k.transpose(-2, -1), v

    def mix(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax of ``scores`` (biases added) applied to the values, then the projection."""
        bn, heads, n, hd = v.shape
        x = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(bn, n, heads * hd)
        return self.proj(x)


class SwinTransformerBlock(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP -> residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = TokenNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = TokenNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int], ctx: ForwardContext) -> torch.Tensor:
        """x: (B, H*W, C) tokens, the authors' way: roll, partition, attend, reverse, roll back.

        Done chunk by chunk of windows (see :func:`~mitdenoise.windows.window_chunks`):
        everything after the shift is per window (attention) or per token (norms, MLP,
        residuals), so a chunk of windows goes through the whole block at once and its
        temporaries stay small enough to be cached and reused.
        """
        h, w = size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        n_rows, n_cols = h // ws, w // ws
        keep = ctx.keep_mask((b * n_rows * n_cols, ws * ws, 1), x.device)
        if ctx.route is Route.TRITON:
            from . import triton_block

            out = triton_block.block_forward(self, x, size, keep, ctx.dtype)
            if out is not None:
                return out  # else the kernel cannot run here (it said so once): the fused attention below
        mask = ctx.shift_mask(h, w, ws, shift, x.device) if shift else None
        chunks = list(window_chunks(b, n_rows, n_cols, ctx.chunk_windows))
        image = x.view(b, h, w, c)
        if shift:
            image = torch.roll(image, shifts=(-shift, -shift), dims=(1, 2))
        out = image if len(chunks) == 1 else torch.empty_like(image)
        for first_image, stop_image, first_row, stop_row in chunks:
            windows = window_partition(image[first_image:stop_image, first_row * ws : stop_row * ws], ws)
            start = (first_image * n_rows + first_row) * n_cols
            part_keep = None if keep is None else keep[start : start + windows.shape[0]]
            windows = self.window_step(windows, part_keep, mask, (first_row, stop_row), ctx.route in FUSED_ROUTES)
            result = window_reverse(windows, ws, (stop_row - first_row) * ws, w)
            if len(chunks) == 1:
                out = result
            else:
                out[first_image:stop_image, first_row * ws : stop_row * ws] = result
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out.reshape(b, h * w, c)

    def window_step(
        self,
        windows: torch.Tensor,
        keep: torch.Tensor | None,
        mask: EdgeShiftMask | None,
        rows: tuple[int, int],
        fused: bool,
    ) -> torch.Tensor:
        """The block on a chunk of windows (window rows ``rows``); ``fused`` takes the attention
        through :func:`~mitdenoise.route_fused.fused_attention`."""
        normed = self.norm1(windows)
        if fused:
            windows = windows + route_fused.fused_attention(self.attn, normed, keep, mask, rows)
        else:
            windows = windows + self.attn(normed, keep, mask, rows)
        return windows + self.mlp(self.norm2(windows))


class ResidualGroup(nn.Module):
    """The Swin blocks of one RSTB (named ``residual_group`` in the checkpoints)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int], ctx: ForwardContext) -> torch.Tensor:
        if ctx.route is Route.CPU:
            return route_cpu.residual_group_forward(self.blocks, x, size, ctx)
        if ctx.route is Route.CPU_TRAINING:
            return route_train.residual_group_forward(self.blocks, x, size, ctx)
        for block in self.blocks:
            x = block(x, size, ctx)
        return x


def tokens_as_image(tokens: torch.Tensor, size: tuple[int, int], channels_last: bool) -> torch.Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) image: a free channels-last view (tokens are NHWC
    in memory, and a channels-last conv takes them as they are), or the authors' transposed copy.
    Back to tokens: ``image.flatten(2).transpose(1, 2)``, free for a channels-last image."""
    b, _, c = tokens.shape
    if channels_last:
        return tokens.view(b, *size, c).permute(0, 3, 1, 2)
    return tokens.transpose(1, 2).reshape(b, c, *size)


def make_body_conv(dim: int, resi_connection: str) -> nn.Module:
    """The conv closing each RSTB and the body: one 3x3 conv, or 3x3 -> 1x1 -> 3x3 through dim/4."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(
        nn.Conv2d(dim, dim // 4, 3, 1, 1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(dim // 4, dim, 3, 1, 1),
    )


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a conv, and a residual around both."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, resi: str) -> None:
        super().__init__()
        self.residual_group = ResidualGroup(dim, depth, num_heads, window_size, mlp_ratio)
        self.conv = make_body_conv(dim, resi)

    def forward(self, x: torch.Tensor, size: tuple[int, int], ctx: ForwardContext) -> torch.Tensor:
        y = self.conv(tokens_as_image(self.residual_group(x, size, ctx), size, ctx.channels_last))
        return x + y.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Image -> tokens, then LayerNorm (holds the ``patch_embed.norm`` weights)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = TokenNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


def attention_chunk(device_type: str, fused: bool) -> int | None:
    """Windows a block takes at a time (:func:`~mitdenoise.windows.window_chunks`): CPU chunks fit
    the cache; the fused route's respect :data:`~mitdenoise.route_fused.FUSED_WINDOWS`; the plain
    CUDA route takes all at once."""
    if device_type == "cpu":
        return CPU_ATTENTION_CHUNK
    return route_fused.FUSED_WINDOWS if fused else None


def train_route_applies(x: torch.Tensor) -> bool:
    """Whether a forward on ``x`` takes the training route (:mod:`mitdenoise.route_train`):
    on the CPU, under autograd, in fp32 without autocast."""
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


class Route(enum.Enum):
    """Which code every Swin block of one forward runs; :func:`choose_route` picks it once."""

    PLAIN = "plain"
    """The modules' own code, the authors' formulation: training on CUDA, the speed reference."""
    CPU = "cpu"
    """CPU inference: :mod:`mitdenoise.route_cpu`, a residual group at a time."""
    CPU_TRAINING = "cpu-training"
    """CPU training in fp32: :mod:`mitdenoise.route_train`, a residual group at a time."""
    FUSED = "fused"
    """CUDA inference: the blocks' attention through :mod:`mitdenoise.route_fused`."""
    TRITON = "triton"
    """CUDA inference under bf16/fp16 autocast: each block one kernel of :mod:`mitdenoise.triton_block`
    (the fused attention for any block where the kernel cannot run)."""


@dataclass(frozen=True)
class RouteCapabilities:
    """What a route can run, as data a caller reads (``ROUTES[Route.CPU].products``) instead of code."""

    devices: tuple[str, ...]
    """Device types :func:`choose_route` sends to it."""
    products: tuple[torch.dtype, ...]
    """The types its products can be in (float32 always; half types by autocast or ``matmul_dtype``)."""
    autograd: bool
    """Whether a forward through it can be differentiated (training)."""
    code: str
    """The module that holds it."""


ROUTES: dict[Route, RouteCapabilities] = {
    Route.PLAIN: RouteCapabilities(("cpu", "cuda"), (torch.float32, torch.bfloat16, torch.float16), True, "mitdenoise.model"),
    Route.CPU: RouteCapabilities(("cpu",), (torch.float32, torch.bfloat16), False, "mitdenoise.route_cpu"),
    Route.CPU_TRAINING: RouteCapabilities(("cpu",), (torch.float32,), True, "mitdenoise.route_train"),
    Route.FUSED: RouteCapabilities(("cuda",), (torch.float32,), True, "mitdenoise.route_fused"),
    Route.TRITON: RouteCapabilities(("cuda",), (torch.bfloat16, torch.float16), False, "mitdenoise.triton_block"),
}
"""Every route's capabilities; all of them run the attention keep-mask (the method needs it at inference)."""

FUSED_ROUTES = (Route.FUSED, Route.TRITON)
"""Routes whose blocks take the fused attention where they run the modules' code."""


def choose_route(x: torch.Tensor, config: ModelConfig, shortcut: bool = True) -> tuple[Route, torch.dtype]:
    """The route a forward on ``x`` takes, and the type its products are in there (float32 but for
    :attr:`Route.TRITON`: the autocast type). ``shortcut=False``: the plain route."""
    if not shortcut:
        return Route.PLAIN, torch.float32
    if torch.is_grad_enabled():
        return (Route.CPU_TRAINING if train_route_applies(x) else Route.PLAIN), torch.float32
    if x.device.type == "cpu":
        return Route.CPU, torch.float32
    if x.device.type != "cuda":
        return Route.PLAIN, torch.float32
    if torch.is_autocast_enabled("cuda"):
        from . import triton_block  # only here: importing Triton takes a while, and fp32 never needs it

        dtype = triton_block.autocast_dtype(config, x.device)
        if dtype is not None:
            return Route.TRITON, dtype
    return Route.FUSED, torch.float32


@dataclass(frozen=True)
class ForwardContext:
    """Per-forward settings shared by all layers: the route, the mask draws and the layout cache.
    Fixed for the forward: nothing in it changes while the layers run."""

    route: Route
    ratio: tuple[int, int]
    """The attention-mask ratio range, percent."""
    generator: torch.Generator | None = None
    cache: dict = dataclasses.field(default_factory=dict)
    """The network's layout cache (shift masks, window orders), kept across forwards."""
    chunk_windows: int | None = None
    """Windows a block takes at a time (None: all at once)."""
    draw_mask: KeepMaskDrawer = draw_keep_mask
    dtype: torch.dtype = torch.float32
    """The products' type: bf16 where the CPU route's linears multiply in bf16, the autocast type for
    :attr:`Route.TRITON`; sums, norms, softmax and the residual stream stay float32."""

    @property
    def channels_last(self) -> bool:
        """Features between convs in channels-last memory: the tokens' own layout, so no transposes."""
        return self.route in (Route.CPU, Route.TRITON)

    def keep_mask(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        return self.draw_mask(shape, self.ratio, self.generator, device)

    def shift_mask(self, h: int, w: int, ws: int, shift: int, device: torch.device) -> EdgeShiftMask:
        return self.cached(("shift_mask", h, w, ws, shift, str(device)), lambda: EdgeShiftMask(h, w, ws, shift, device))

    def cached(self, key: tuple, make):
        """``make()``, kept in the network's layout cache under ``key``."""
        value = self.cache.get(key)
        if value is None:
            if len(self.cache) >= LAYOUT_CACHE_ENTRIES:
                self.cache.clear()  # many image sizes seen: start afresh rather than grow
            value = self.cache[key] = make()
        return value


class SwinIR(nn.Module):
    """SwinIR denoiser; with the default config, the masked-training network of Chen et al. 2023.

    Input and output are (B, C, H, W) in [0, 1] (the output is not clamped). Any H, W:
    the image is reflect-padded bottom/right to a multiple of the window and cropped back.
    """

    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        cin, dim = config.in_chans, config.embed_dim
        mean = RGB_MEAN if cin == 3 else (0.0,) * cin
        self.register_buffer("mean", torch.tensor(mean).view(1, cin, 1, 1), persistent=False)
        k = config.conv_first_kernel
        self.conv_first = nn.Conv2d(cin, dim, k, 1, k // 2)
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.ModuleList(
            RSTB(dim, d, h, config.window_size, config.mlp_ratio, config.resi_connection)
            for d, h in zip(config.depths, config.num_heads)
        )
        self.norm = TokenNorm(dim)
        self.conv_after_body = make_body_conv(dim, config.resi_connection)
        self.conv_last = nn.Conv2d(dim, cin, 3, 1, 1)
        self._layout_cache: dict = {}

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        shortcut: bool = True,
        chunked: bool = True,
        draw_mask: KeepMaskDrawer = draw_keep_mask,
        mask_ratio: tuple[int, int] | None = None,
        matmul_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Denoise ``x``; ``generator`` makes the attention mask reproducible.

        The route is chosen once, by :func:`choose_route`: on CPU without autograd the CPU
        route (:mod:`mitdenoise.route_cpu`), under autograd in fp32 the training route
        (:mod:`mitdenoise.route_train`, :func:`train_route_applies`); on CUDA without
        autograd the fused attention (:mod:`mitdenoise.route_fused`), or under bf16/fp16
        autocast each Swin block as one Triton kernel
        (:func:`mitdenoise.triton_block.autocast_dtype`).
        ``shortcut=False`` forces the plain computation (the speed reference and the tests
        that pin the routes to it). ``chunked=False`` has every block take all its windows
        at once, and ``draw_mask`` draws the attention keep-masks instead of
        :func:`~mitdenoise.masking.draw_keep_mask`: the speed reference runs the network as
        the authors' code does. ``mask_ratio`` replaces the config's attention-mask ratio for
        this call (training's curriculum ramps it up). ``matmul_dtype=torch.bfloat16`` has the
        CPU route's linears multiply in bf16 (:func:`mitdenoise.route_cpu.linear`); it is an
        error on any other route.
        """
        h, w = x.shape[-2:]
        ws = self.config.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        x = x - self.mean
        ratio = self.config.attn_mask_ratio if mask_ratio is None else tuple(mask_ratio)
        route, dtype = choose_route(x, self.config, shortcut)
        if matmul_dtype != torch.float32:
            if route is not Route.CPU or matmul_dtype not in ROUTES[route].products:
                raise ValueError(f"matmul_dtype={matmul_dtype} is for the CPU inference route only")
            dtype = matmul_dtype
        chunk = attention_chunk(x.device.type, route in FUSED_ROUTES) if chunked else None
        ctx = ForwardContext(route, ratio, generator, self._layout_cache, chunk, draw_mask, dtype)
        if ctx.channels_last:  # the tokens' own layout: no transposes around the convs
            x = x.contiguous(memory_format=torch.channels_last)
        first = self.conv_first(x)
        size = first.shape[-2:]
        tokens = self.patch_embed(first)
        for layer in self.layers:
            tokens = layer(tokens, size, ctx)
        body = self.conv_after_body(tokens_as_image(self.norm(tokens), size, ctx.channels_last))
        if self.config.global_residual:
            y = x + self.conv_last(body + first)
        else:
            y = self.conv_last(body)
        return (y + self.mean)[..., :h, :w].contiguous()


_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.residual_group\.blocks\.(\d+)\.")


def config_from_state_dict(state: dict[str, torch.Tensor], **known) -> ModelConfig:
    """Read the architecture from tensor shapes; ``known`` supplies what shapes can't tell.

    Shapes give channels, width, depths, heads, window, MLP ratio and conv style.
    They can't tell the wiring or the attention-mask ratio: unless given, a 1x1
    ``conv_first`` is taken as the masked-training model (no global residual, mask
    75 %) and a 3x3 one as an original SwinIR denoiser (global residual, no mask).
    """
    try:
        conv_first = state["conv_first.weight"]
        blocks: dict[int, set[int]] = {}
        for key in state:
            m = _BLOCK_KEY.match(key)
            if m:
                blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        if not blocks:
            raise KeyError("layers.*.residual_group.blocks.*")
        n_layers = max(blocks) + 1
        depths = tuple(max(blocks.get(i, {-1})) + 1 for i in range(n_layers))
        heads = tuple(
            int(state[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1])
            for i in range(n_layers)
        )
        table = state["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"]
        window = (math.isqrt(int(table.shape[0])) + 1) // 2
        fc1 = state["layers.0.residual_group.blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"not a SwinIR state dict (missing {e.args[0]})") from None
    embed_dim, in_chans, k = int(conv_first.shape[0]), int(conv_first.shape[1]), int(conv_first.shape[2])
    original_wiring = k == 3
    values = dict(
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window,
        mlp_ratio=fc1.shape[0] / embed_dim,
        resi_connection="3conv" if "conv_after_body.0.weight" in state else "1conv",
        conv_first_kernel=k,
        global_residual=original_wiring,
        attn_mask_ratio=(0, 0) if original_wiring else (75, 75),
    )
    values.update(known)
    return ModelConfig(**values)


def load_state_dict_into(model: SwinIR, state: dict[str, torch.Tensor]) -> None:
    """Load parameters strictly; accept the checkpoint's buffers but recompute them.

    ``relative_position_index`` is checked (a different one means a different network);
    stored ``attn_mask`` buffers were computed for the 64x64 training size and are
    ignored: the shift mask is recomputed for the actual image size.
    """
    expected = model.state_dict()
    params = {}
    for key, value in state.items():
        if key.endswith(".attn_mask"):
            continue
        if key.endswith("relative_position_index"):
            if key in expected and not torch.equal(value.to(expected[key].dtype), expected[key]):
                raise ValueError(f"{key} differs from the standard relative-position index")
            continue
        params[key] = value
    missing = [k for k in expected if k not in params and not k.endswith("relative_position_index")]
    unexpected = [k for k in params if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise ValueError("state dict does not match the network: " + ", ".join(parts))
    for key, value in params.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key} has shape {tuple(value.shape)}, the network expects {tuple(expected[key].shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{key} has dtype {value.dtype}, expected a floating-point tensor")
    model.load_state_dict(params, strict=False)
