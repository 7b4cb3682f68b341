"""The network: SwinIR as the masked-training paper uses it, with the attention mask.

State-dict names are those of the authors' (and the original SwinIR) code, so their
checkpoints load as they are. The one addition is the attention keep-mask: inside
every window attention the input tokens are zeroed at random with probability
``r`` (75 % for the released model), at training and at inference alike.

Inference on the CPU takes a faster route to the same numbers (to 1e-5): attention
exploits the zeroed tokens (:meth:`WindowAttention.forward_masked`); each block gathers
its windows straight from the previous block's output, in chunks of windows with about
as many kept tokens, and hands them on in that order
(:meth:`SwinTransformerBlock.forward_gathered`); chunks run on parallel single-thread
workers (:func:`chunk_workers`); linears take oneDNN (:func:`cpu_linear`); convs run
channels-last on the tokens' own memory.
Inference on CUDA runs attention as one fused kernel (:meth:`WindowAttention.forward_fused`).
Training and the speed reference take the plain route, the authors' formulation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)
CPU_ATTENTION_CHUNK = 128
"""Windows per chunk on CPU: 8192 tokens, 12 MB of attention scores for 6 heads."""
MLP_ROWS = 2048
"""Tokens per MLP call on the shortcut route: a chunk's 8192 in slices of 2048 run ~4 % faster (cache)."""
FUSED_WINDOWS = 32768
"""Windows per chunk on the fused (CUDA) route: each fused attention call stays under CUDA's
65535-block grid limit (y and z), along which attention kernels may lay out their batch."""
LAYOUT_CACHE_ENTRIES = 32
"""Shift masks and window orders kept per network (two per image size seen)."""


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


def is_int(value) -> bool:
    """An int that is not a bool (TOML and JSON settings)."""
    return isinstance(value, int) and not isinstance(value, bool)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws*ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws*ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index into the ((2ws-1)^2, heads) bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shift_mask(h: int, w: int, ws: int, shift: int, device: torch.device | None = None) -> torch.Tensor:
    """(nW, N, N) additive mask (0 / -100) that stops attention across the cyclic-shift seam."""
    region = torch.zeros(1, h, w, 1, device=device)
    label = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            region[:, hs, wsl, :] = label
            label += 1
    windows = window_partition(region, ws).squeeze(-1)
    diff = windows[:, None, :] - windows[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class EdgeShiftMask:
    """The shift mask kept only where it is not zero: the last row and column of windows.

    After the cyclic shift only windows that wrap around the image edge mix regions,
    so adding the -100 mask to those alone equals adding the full (nW, N, N) mask,
    at a fraction of the memory traffic.
    """

    def __init__(self, h: int, w: int, ws: int, shift: int, device: torch.device | None = None) -> None:
        self.grid = (h // ws, w // ws)
        full = shift_mask(h, w, ws, shift, device).view(*self.grid, ws * ws, ws * ws)
        self.last_row = full[-1].unsqueeze(1).contiguous()  # (nWw, 1, N, N): broadcast over heads
        self.last_col = full[:-1, -1].unsqueeze(1).contiguous()  # (nWh - 1, 1, N, N)
        self._edges: dict = {}

    def edges(self, rows: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked windows among window rows ``rows`` of one image, in partition order:
        their index there, and their masks (E, 1, N, N)."""
        cached = self._edges.get(rows)
        if cached is not None:
            return cached
        first, stop = rows
        n_rows, n_cols = self.grid
        inner_stop = min(stop, n_rows - 1)
        index, masks = [], []
        if inner_stop > first:
            index.append(torch.arange(inner_stop - first) * n_cols + (n_cols - 1))
            masks.append(self.last_col[first:inner_stop])
        if stop == n_rows:
            index.append(torch.arange(n_cols) + (n_rows - 1 - first) * n_cols)
            masks.append(self.last_row)
        cached = self._edges[rows] = (torch.cat(index).to(self.last_row.device), torch.cat(masks))
        return cached

    def add_to(self, scores: torch.Tensor, rows: tuple[int, int]) -> None:
        """In place on scores of window rows ``rows`` of some images: (images, rows, nWw, heads, N, N)."""
        first, stop = rows
        n_rows = self.grid[0]
        if stop == n_rows:
            scores[:, -1] += self.last_row
        inner_stop = min(stop, n_rows - 1)
        if inner_stop > first:
            scores[:, : inner_stop - first, -1] += self.last_col[first:inner_stop]


def draw_keep_mask(
    shape: tuple[int, ...], ratio_range: tuple[int, int], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | None:
    """0/1 float mask: each token kept with probability 1 - r, r drawn from ``ratio_range`` (%)."""
    low, high = ratio_range
    if high == 0:
        return None
    if low == high:
        ratio = low / 100
    else:
        ratio = int(torch.randint(low, high + 1, (1,), generator=generator, device=device).item()) / 100
    return (torch.rand(shape, generator=generator, device=device) >= ratio).float()


def window_kinds(n_rows: int, n_cols: int, images: int, shifted: bool) -> torch.Tensor:
    """Kind of every window of ``images`` images of n_rows x n_cols windows, in partition order.

    0 inner, 1 last column, 2 last row, 3 corner: after the cyclic shift only these
    edge windows mix regions, and each kind has one shift-mask pattern. Unshifted, all 0.
    """
    if not shifted:
        return torch.zeros(images * n_rows * n_cols, dtype=torch.long)
    row = torch.arange(n_rows).view(-1, 1)
    col = torch.arange(n_cols).view(1, -1)
    kinds = (col == n_cols - 1).long() + 2 * (row == n_rows - 1).long()
    return kinds.flatten().repeat(images)


def _has_onednn_linear() -> bool:
    """Whether oneDNN's linear is there and answers as expected (it is a private op of torch's)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x, weight, bias = torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "none")
    except (RuntimeError, TypeError):
        return False
    return y.shape == (2, 4) and bool((y == 4).all())


ONEDNN_LINEAR = _has_onednn_linear()
"""Whether :func:`cpu_linear` can take oneDNN (x86 builds of torch have it)."""


def cpu_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, then GELU if ``gelu``, for 2-D inference inputs on the shortcut route.

    Through oneDNN's linear where torch has it: measured here on one thread, the block's
    token-wise shapes ((2048-8192) x 60 x {60, 120, 180}) ran at 200 GFLOP/s there against
    80-100 through ``F.linear`` (MKL), and the GELU fuses into its output pass; the
    attention's 64 x 64 by 64 x 1536 products at 172 against 93 (``torch.bmm``).
    Same values to fp32 rounding (tests/test_model.py pins the two together).
    """
    if ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none")
    y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def token_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dim in fp32, as a mean-variance reduction and two passes."""
    x = x.float()
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    return torch.addcmul(bias, (x - mean) * torch.rsqrt(var + eps), weight)


class TokenNorm(nn.LayerNorm):
    """LayerNorm of each token's channels; in CUDA inference through :func:`token_layer_norm`.

    torch's CUDA LayerNorm took 1.6 ms per call on a 1024x1024 tile's 60-channel tokens,
    a third of the forward (H200, torch 2.11); the reduction and two passes made the
    whole forward 12 % faster in bf16 (4.33 -> 4.84 MP/s). Training keeps torch's: its
    backward was faster (4.80 against 4.35 steps/s). The CUDA speed reference gets this
    norm too (norms see no forward context), which can only make the reference faster.
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

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual += forward(x)`` in place, for 2-D ``x`` (the shortcut route: :func:`cpu_linear`)."""
        hidden = cpu_linear(x, self.fc1.weight, self.fc1.bias, gelu=True)
        return residual.add_(cpu_linear(hidden, self.fc2.weight, self.fc2.bias))


def _same_tensor_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def short_row_softmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.softmax(-1)`` for the shortcut's rows of n_kept + 1 scores; rows under 16 are done
    in ``scores`` itself (the caller drops it), longer ones in a new tensor.

    torch's CPU softmax takes a scalar loop for rows shorter than 16 floats: measured
    here (one thread, 768 x 14 x 15 scores) 2.0 ms, against 0.38 ms for max, subtract,
    exp, sum and divide as separate vectorised passes (which lose from 19 columns up).
    """
    if scores.shape[-1] >= 16:
        return scores.softmax(dim=-1)
    scores -= scores.amax(-1, keepdim=True)
    scores.exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


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
        self._last_exp_biases: tuple | None = None

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def kind_biases(self, shift: int) -> torch.Tensor:
        """Position bias plus shift mask of each window kind (see :func:`window_kinds`): (4, heads, N, N)."""
        inner = self.position_bias()
        if not shift:
            return inner.expand(4, -1, -1, -1).contiguous()
        ws = self.window_size
        return inner + shift_mask(2 * ws, 2 * ws, ws, shift, inner.device).unsqueeze(1)  # one window per kind

    def exp_biases(self, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For :meth:`forward_masked`: ``exp(bias)`` with each row scaled so that its largest entry
        is 1, zero across the shift seam, and the log of that scale, (4, heads, N). None where
        the exponential could underflow a whole row.

        Kept from the last call while ``bias`` is the same (it is, tile after tile): about
        1 ms a block, 5 % of a 128x128 tile's forward.
        """
        last = self._last_exp_biases
        if last is not None and _same_tensor_values(last[0], bias):
            return last[1]
        if float(bias[0].amax() - bias[0].amin()) > 60:  # kind 0 has no seam: the position bias alone
            result = None
        else:
            row_max = bias.amax(-1)
            result = (bias - row_max.unsqueeze(-1)).exp().masked_fill_(bias < -50, 0.0), row_max
        self._last_exp_biases = (bias, result)
        return result

    def forward_masked(
        self,
        x: torch.Tensor,
        keep: torch.Tensor,
        bias: torch.Tensor,
        exp_biases: tuple[torch.Tensor, torch.Tensor],
        kinds: torch.Tensor,
        norm: nn.Module,
    ) -> torch.Tensor | None:
        """``x += forward(norm(x), keep)``, in place, in a fraction of the time (inference only).

        A masked token enters ``qkv`` as zeros, so its query, key and value are all the
        ``qkv`` bias. So ``qkv`` runs on the kept tokens only (padded with masked ones to
        the chunk's largest count: the "listed" tokens of a window); the rest, all alike
        but for their position, are handled in aggregate:

        - masked queries score ``c_j + bias_ij`` with ``c_j`` the same for all of them, so
          their softmax numerators factorise as ``exp(c_j) * exp(bias_ij)`` and all of them
          share one GEMM per window kind;
        - a listed query sees the listed keys one by one and the rest as one key, ``k_bias``
          with value ``v_bias``, whose position bias is ``log sum_j exp(bias_ij)`` over the
          rest (a column of that same GEMM).

        ``norm`` (the block's first LayerNorm) is applied here, to the listed tokens only.
        Returns None, with ``x`` untouched, where weights could underflow (the caller then
        takes :meth:`forward_by_kind`).
        """
        exp_bias, row_max = exp_biases
        bw, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        keep = keep.view(bw, n)
        n_kept = int(keep.sum(1).max())
        # The first n_kept tokens of every window after this sort include all its kept ones.
        order = torch.argsort(keep, dim=1, descending=True, stable=True)[:, :n_kept]
        listed_rows = (order + torch.arange(0, bw * n, n, device=x.device).unsqueeze(1)).flatten()  # into (bw * N) rows
        x_kept = norm(x.view(bw * n, c).index_select(0, listed_rows).view(bw, n_kept, c))
        x_kept *= torch.gather(keep, 1, order).unsqueeze(-1)
        qkv_kept = cpu_linear(x_kept.view(bw * n_kept, c), self.qkv.weight, self.qkv.bias)
        qkv_kept = qkv_kept.view(bw, n_kept, 3, heads, hd).permute(2, 3, 0, 1, 4)  # (3, heads, bw, nk, hd)
        q_bias, k_bias, v_bias = self.qkv.bias.view(3, heads, 1, hd)

        # Masked queries: weights exp(c_j - max c) * exp_bias_ij over all N keys, then normalise.
        listed_scores = (qkv_kept[1] @ (q_bias * self.scale).unsqueeze(-1)).squeeze(-1)  # (heads, bw, nk)
        rest_score = (k_bias * q_bias).sum(-1) * self.scale  # (heads, 1)
        top = torch.maximum(listed_scores.amax(-1), rest_score)  # (heads, bw)
        listed_weights = (listed_scores - top.unsqueeze(-1)).exp_()
        rest_weights = (rest_score - top).exp_()
        # Per window, head and key position j: [w_j v_j, w_j, 1 if j is in the rest], keys last.
        values = torch.empty(heads, bw, hd + 2, n, dtype=x.dtype, device=x.device)
        values[:, :, :hd] = (rest_weights.unsqueeze(-1) * v_bias).unsqueeze(-1)
        values[:, :, hd] = rest_weights.unsqueeze(-1)
        values[:, :, hd + 1] = 1.0
        listed = torch.empty(heads, bw, hd + 2, n_kept, dtype=x.dtype, device=x.device)
        torch.mul(qkv_kept[2].transpose(2, 3), listed_weights.unsqueeze(2), out=listed[:, :, :hd])
        listed[:, :, hd] = listed_weights
        listed[:, :, hd + 1] = 0.0
        values.scatter_(3, order.view(1, bw, 1, n_kept).expand(heads, bw, hd + 2, n_kept), listed)
        # (heads, N, bw, hd + 2): exp_bias @ values, window by window, as one linear per head.
        sums = torch.stack([cpu_linear(exp_bias[0, h], values[h].view(-1, n)) for h in range(heads)])
        sums = sums.view(heads, n, bw, hd + 2)
        for kind in (1, 2, 3):
            windows = (kinds == kind).nonzero().flatten()
            if len(windows):
                part = torch.bmm(exp_bias[kind], values.index_select(1, windows).view(heads, -1, n).transpose(1, 2))
                sums.index_copy_(2, windows, part.view(heads, n, -1, hd + 2))
        inverse_sums = sums[..., hd].reciprocal()
        if not bool(inverse_sums.amax() < 1e30):
            return None  # a row sees only keys whose weights underflowed
        out = torch.empty(bw, n, heads, hd, dtype=x.dtype, device=x.device)
        torch.mul(sums[..., :hd], inverse_sums.unsqueeze(-1), out=out.permute(2, 1, 0, 3))

        # Listed queries: the listed keys one by one, then the rest as one key.
        positions = order.unsqueeze(2) * n + order.unsqueeze(1)  # (bw, nk, nk) into an N x N bias
        positions += (kinds * (n * n)).view(bw, 1, 1)
        attn = torch.empty(heads, bw, n_kept, n_kept + 1, dtype=x.dtype, device=x.device)
        per_head = bias.transpose(0, 1).reshape(heads, -1)
        attn[..., :n_kept] = per_head.index_select(1, positions.flatten()).view(heads, bw, n_kept, n_kept)
        # The rest's position bias: log of its exp_bias row sum, plus the row's scale.
        rest_bias = sums[..., hd + 1].gather(1, order.t().unsqueeze(0).expand(heads, n_kept, bw)).log_().transpose(1, 2)
        query_rows = (order + (kinds * n).unsqueeze(1)).flatten()
        rest_bias += row_max.transpose(0, 1).reshape(heads, -1).index_select(1, query_rows).view(heads, bw, n_kept)
        attn[..., n_kept] = rest_bias
        keys = torch.empty(heads, bw, n_kept + 1, hd, dtype=x.dtype, device=x.device)
        keys[:, :, :n_kept] = qkv_kept[1]
        keys[:, :, n_kept] = k_bias
        vals = torch.empty(heads, bw, n_kept + 1, hd, dtype=x.dtype, device=x.device)
        vals[:, :, :n_kept] = qkv_kept[2]
        vals[:, :, n_kept] = v_bias
        attn = attn.view(heads * bw, n_kept, n_kept + 1)
        q = qkv_kept[0].reshape(heads * bw, n_kept, hd)
        attn.baddbmm_(q, keys.view(heads * bw, n_kept + 1, hd).transpose(1, 2), alpha=self.scale)
        attn = short_row_softmax(attn)
        kept_out = torch.bmm(attn, vals.view(heads * bw, n_kept + 1, hd)).view(heads, bw, n_kept, hd)
        out.view(bw * n, c).index_copy_(0, listed_rows, kept_out.permute(1, 2, 0, 3).reshape(bw * n_kept, c))
        x.view(bw * n, c).add_(cpu_linear(out.view(bw * n, c), self.proj.weight, self.proj.bias))
        return x

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor | None, mask: EdgeShiftMask | None, rows: tuple[int, int]
    ) -> torch.Tensor:
        """Attention over whole window rows ``rows`` of one or more images.

        x: (images * rows * nWw, N, C) windows; keep: the same with C = 1, the token
        keep-mask; mask: the shift mask of a shifted block.
        """
        attn, v = self._scores(x, keep)
        attn += self.position_bias().unsqueeze(0)
        if mask is not None:
            n_cols = mask.grid[1]
            mask.add_to(attn.view(-1, rows[1] - rows[0], n_cols, self.num_heads, *attn.shape[-2:]), rows)
        return self._mix(attn, v)

    def forward_fused(
        self, x: torch.Tensor, keep: torch.Tensor | None, mask: EdgeShiftMask | None, rows: tuple[int, int]
    ) -> torch.Tensor:
        """:meth:`forward` through ``F.scaled_dot_product_attention`` (the CUDA route; on an
        H200 with torch 2.11 it runs cuDNN's fused kernel).

        Unfused, the (windows, heads, N, N) scores go to memory and back four times,
        most of the network's memory traffic; a fused kernel keeps them on chip. All
        windows take the position bias alone, then the few masked ones (the shifted
        block's last row and column of windows) are redone with their shift mask.
        Inference only: on torch 2.11 (H200) the efficient kernel's backward refused
        these shapes ("LSE is not correctly aligned"), and its math fallback trained
        slower than the plain route.
        """
        if keep is not None:
            x = x * keep
        bn, n, c = x.shape
        hd = c // self.num_heads
        q, k, v = self._padded_qkv(x).permute(2, 0, 3, 1, 4).unbind(0)  # (bn, heads, N, padded hd)
        bias = self.position_bias().to(q.dtype).contiguous()  # kernels want the mask's rows contiguous
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(bn, -1, -1, -1), scale=self.scale)
        if mask is not None:
            index, masks = mask.edges(rows)
            per_image = (rows[1] - rows[0]) * mask.grid[1]
            images = bn // per_image
            index = (torch.arange(images, device=index.device).unsqueeze(1) * per_image + index).flatten()
            edge_bias = (bias + masks.to(bias.dtype)).repeat(images, 1, 1, 1)
            edge = F.scaled_dot_product_attention(
                q.index_select(0, index), k.index_select(0, index), v.index_select(0, index),
                attn_mask=edge_bias, scale=self.scale,
            )
            out = out.index_copy(0, index, edge)
        return self.proj(out[..., :hd].transpose(1, 2).reshape(bn, n, c))

    def _padded_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``qkv(x)`` as (bn, N, 3, heads, hd') with each head zero-padded to hd' = a multiple of 8.

        Fused attention kernels need the head size aligned (16 bytes); the network's
        is 60 / 6 = 10. Zero columns leave the products unchanged, and padding the
        weights rather than the activations costs no extra copy.
        """
        bn, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        padded = -(-hd // 8) * 8
        weight = self.qkv.weight.view(3, heads, hd, c)
        bias = self.qkv.bias.view(3, heads, hd)
        if padded != hd:
            weight = F.pad(weight, (0, 0, 0, padded - hd))
            bias = F.pad(bias, (0, padded - hd))
        return F.linear(x, weight.reshape(-1, c), bias.reshape(-1)).view(bn, n, 3, heads, padded)

    def forward_unmasked(self, x: torch.Tensor, bias: torch.Tensor, kinds: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``x += forward(norm(x))``, in place, for windows without a keep-mask (inference only).

        ``kinds`` must be sorted (:meth:`SwinTransformerBlock.forward_gathered` sorts the
        windows by kind), so each kind is one run of windows and takes its bias in
        ``F.scaled_dot_product_attention`` as a broadcast mask: no per-window copy of the
        bias, and the (windows, heads, N, N) scores stay inside torch's CPU flash kernel.
        Measured here (one thread, a chunk of 128 windows of the default model's block):
        9.4-9.9 ms a chunk against 12.7-13.7 through :meth:`forward_by_kind` (products,
        softmax and a gathered copy of the bias per window); the whole default model at
        1024x1024 went from 10.3 to 5.9 s/MP on 2 threads.
        """
        bw, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        qkv = cpu_linear(norm(x).view(bw * n, c), self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(bw, n, 3, heads, hd).permute(2, 0, 3, 1, 4)  # (bw, heads, N, hd) each
        out = torch.empty(bw, n, heads, hd, dtype=x.dtype, device=x.device)
        start = 0
        for kind, count in enumerate(torch.bincount(kinds, minlength=len(bias)).tolist()):
            if count:
                part = slice(start, start + count)
                attended = F.scaled_dot_product_attention(
                    q[part], k[part], v[part], attn_mask=bias[kind].unsqueeze(0), scale=self.scale
                )
                out[part] = attended.transpose(1, 2)
                start += count
        return x.view(bw * n, c).add_(cpu_linear(out.view(bw * n, c), self.proj.weight, self.proj.bias)).view(bw, n, c)

    def forward_by_kind(self, x: torch.Tensor, keep: torch.Tensor | None, bias: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for windows in any order: window ``i`` takes ``bias[kinds[i]]``, its
        position bias plus shift mask (see :meth:`kind_biases`)."""
        attn, v = self._scores(x, keep)
        attn += bias.index_select(0, kinds)
        return self._mix(attn, v)

    def _scores(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled query-key products (windows, heads, N, N) of the kept tokens, and the values."""
        if keep is not None:
            x = x * keep
        bn, n, c = x.shape
        qkv = self.qkv(x).reshape(bn, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return (q * self.scale) @ k.transpose(-2, -1), v

    def _mix(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bn, heads, n, hd = v.shape
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bn, n, heads * hd)
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

    def forward(self, x: torch.Tensor, size: tuple[int, int], ctx: "ForwardContext") -> torch.Tensor:
        """x: (B, H*W, C) tokens, the authors' way: roll, partition, attend, reverse, roll back.

        Done chunk by chunk of windows (see :func:`window_chunks`): everything after the
        shift is per window (attention) or per token (norms, MLP, residuals), so a chunk
        of windows goes through the whole block at once and its temporaries stay small
        enough to be cached and reused.
        """
        h, w = size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        n_rows, n_cols = h // ws, w // ws
        keep = ctx.keep_mask((b * n_rows * n_cols, ws * ws, 1), x.device)
        if ctx.kernel_dtype is not None:
            from . import triton_block

            out = triton_block.block_forward(self, x, size, keep, ctx.kernel_dtype)
            if out is not None:
                return out
            ctx.kernel_dtype = None  # the kernel cannot run here: this block and the rest take the fused route
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
            windows = self.window_step(windows, part_keep, mask, (first_row, stop_row), ctx.fused_attention)
            result = window_reverse(windows, ws, (stop_row - first_row) * ws, w)
            if len(chunks) == 1:
                out = result
            else:
                out[first_image:stop_image, first_row * ws : stop_row * ws] = result
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out.reshape(b, h * w, c)

    def forward_gathered(
        self, flat: torch.Tensor, rows: torch.Tensor | None, size: tuple[int, int], ctx: "ForwardContext"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block for the shortcut route, on tokens held in any row order.

        ``flat[p]`` is token ``rows[p]`` of the B*H*W tokens (``rows`` None: token order).
        Windows are gathered straight from it (shift and partition in one copy, see
        :func:`window_order`) into the output, in chunks of windows with about as many
        kept tokens, and worked on in place there; attention takes
        :meth:`WindowAttention.forward_masked`. Returns the output and its ``rows``: the
        next block gathers from it as it is, so nothing is scattered back to token order.
        """
        h, w = size
        c = flat.shape[1]
        b = flat.shape[0] // (h * w)
        ws, shift = self.window_size, self.shift_size
        n_rows, n_cols, n = h // ws, w // ws, ws * ws
        keep = ctx.keep_mask((b * n_rows * n_cols, n, 1), flat.device)
        # without a keep-mask, each window kind one run of windows, for forward_unmasked
        order, kinds = ctx.window_layout(b, h, w, ws, shift, flat.device, by_kind=keep is None)
        bias = self.attn.kind_biases(shift)
        exp_biases = None if keep is None else self.attn.exp_biases(bias)
        if keep is not None:  # windows with about as many kept tokens together: little padding in forward_masked
            by_count = torch.argsort(keep.view(len(order), -1).sum(1), stable=True)
            order, kinds, keep = order[by_count], kinds[by_count], keep[by_count]
        out_rows = order.flatten()
        source = out_rows if rows is None else inverse_permutation(rows).index_select(0, out_rows)
        out = torch.empty_like(flat)
        step = ctx.chunk_windows or len(order)

        def run_chunk(start: int) -> None:
            stop = min(start + step, len(order))
            windows = out[start * n : stop * n]
            torch.index_select(flat, 0, source[start * n : stop * n], out=windows)
            part_keep = None if keep is None else keep[start:stop]
            self.window_step_gathered(windows.view(stop - start, n, c), part_keep, bias, exp_biases, kinds[start:stop])

        ctx.map_chunks(run_chunk, list(range(0, len(order), step)))
        return out, out_rows

    def window_step(
        self,
        windows: torch.Tensor,
        keep: torch.Tensor | None,
        mask: EdgeShiftMask | None,
        rows: tuple[int, int],
        fused: bool,
    ) -> torch.Tensor:
        """The block on a chunk of windows (window rows ``rows``), the authors' way; ``fused``
        takes :meth:`WindowAttention.forward_fused`."""
        attend = self.attn.forward_fused if fused else self.attn
        windows = windows + attend(self.norm1(windows), keep, mask, rows)
        return windows + self.mlp(self.norm2(windows))

    def window_step_gathered(
        self,
        windows: torch.Tensor,
        keep: torch.Tensor | None,
        bias: torch.Tensor,
        exp_biases: tuple[torch.Tensor, torch.Tensor] | None,
        kinds: torch.Tensor,
    ) -> None:
        """The block on windows in any order (sorted by kind where there is no ``keep``), in
        place: without a keep-mask through :meth:`WindowAttention.forward_unmasked`, with one
        through :meth:`WindowAttention.forward_masked` where ``exp_biases`` allow and its
        weights do not underflow."""
        if keep is None:
            self.attn.forward_unmasked(windows, bias, kinds, self.norm1)
        elif exp_biases is None or self.attn.forward_masked(windows, keep, bias, exp_biases, kinds, self.norm1) is None:
            windows += self.attn.forward_by_kind(self.norm1(windows), keep, bias, kinds)
        for rows in windows.view(-1, windows.shape[-1]).split(MLP_ROWS):
            self.mlp.add_to(rows, self.norm2(rows))


def window_order(images: int, h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Token index (into ``images`` flattened H*W images) of every token in window-partition order,
    after a cyclic shift by ``shift``: gathering with it does the roll and the partition in one copy."""
    index = torch.arange(images * h * w).view(images, h, w, 1)
    if shift:
        index = torch.roll(index, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(index, ws).flatten()


def window_chunks(images: int, n_rows: int, n_cols: int, chunk_windows: int | None):
    """(first image, stop image, first window row, stop window row) of chunks of about ``chunk_windows``.

    A chunk is either several whole images or some window rows of one image, so that
    its windows are contiguous in window-partition order.
    """
    per_image = n_rows * n_cols
    if chunk_windows is None or images * per_image <= chunk_windows:
        yield 0, images, 0, n_rows
    elif per_image <= chunk_windows:
        step = chunk_windows // per_image
        for first in range(0, images, step):
            yield first, min(first + step, images), 0, n_rows
    else:
        step = max(1, chunk_windows // n_cols)
        for image in range(images):
            for first in range(0, n_rows, step):
                yield image, image + 1, first, min(first + step, n_rows)


class ResidualGroup(nn.Module):
    """The Swin blocks of one RSTB (named ``residual_group`` in the checkpoints)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2, mlp_ratio)
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int], ctx: "ForwardContext") -> torch.Tensor:
        if not ctx.masked_shortcut:
            for block in self.blocks:
                x = block(x, size, ctx)
            return x
        flat, rows = x.reshape(-1, x.shape[-1]), None
        for block in self.blocks:
            flat, rows = block.forward_gathered(flat, rows, size, ctx)
        return flat.index_select(0, inverse_permutation(rows)).view(x.shape)


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """``inverse[index[p]] == p``."""
    return torch.empty_like(index).scatter_(0, index, torch.arange(len(index), device=index.device))


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

    def forward(self, x: torch.Tensor, size: tuple[int, int], ctx: "ForwardContext") -> torch.Tensor:
        y = self.conv(tokens_as_image(self.residual_group(x, size, ctx), size, ctx.channels_last))
        return x + y.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Image -> tokens, then LayerNorm (holds the ``patch_embed.norm`` weights)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = TokenNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


_CHUNK_WORKERS: dict = {}


def chunk_workers():
    """A pool of ``torch.get_num_threads()`` workers that run ops on one thread each; None for one.

    Measured here (2 cores, full network, 368x368 tile): chunks two at a time on one
    thread each took 24.1 s/MP, one at a time on two threads 28.8: a chunk's ops are
    small, so splitting each op across threads mostly waits. Same numbers either way.
    """
    n = torch.get_num_threads()
    if n < 2 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None  # under torchrun (validation while training) keep to the caller's thread
    pool = _CHUNK_WORKERS.get(n)
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _CHUNK_WORKERS[n] = ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,))
    return pool


def attention_chunk(device_type: str, fused: bool) -> int | None:
    """Windows a block takes at a time (:func:`window_chunks`): CPU chunks fit the cache; the
    fused route's respect :data:`FUSED_WINDOWS`; the plain CUDA route takes all at once."""
    if device_type == "cpu":
        return CPU_ATTENTION_CHUNK
    return FUSED_WINDOWS if fused else None


class ForwardContext:
    """Per-forward state shared by all layers: the mask generator and cached shift masks."""

    def __init__(
        self,
        ratio: tuple[int, int],
        generator: torch.Generator | None,
        cache: dict,
        chunk_windows: int | None,
        masked_shortcut: bool,
        fused_attention: bool = False,
        kernel_dtype: torch.dtype | None = None,
    ) -> None:
        self.ratio = ratio
        self.masked_shortcut = masked_shortcut
        self.fused_attention = fused_attention
        self.kernel_dtype = kernel_dtype
        """Set: every Swin block is one Triton kernel (triton_block.py) with products in this type."""
        self.channels_last = masked_shortcut or kernel_dtype is not None
        """Features between convs in channels-last memory: the tokens' own layout, so no transposes."""
        self.generator = generator
        self.cache = cache
        self.chunk_windows = chunk_windows

    def map_chunks(self, run, chunks: list) -> None:
        """Run ``run`` on every chunk: on CPU workers of one intra-op thread each where there are several."""
        pool = chunk_workers() if len(chunks) > 1 else None
        if pool is None:
            for chunk in chunks:
                run(chunk)
            return

        inference = torch.is_inference_mode_enabled()

        def run_without_grad(chunk):  # autograd modes are per thread: take the caller's
            with torch.inference_mode() if inference else torch.no_grad():
                run(chunk)

        for _ in pool.map(run_without_grad, chunks):
            pass

    def keep_mask(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        return draw_keep_mask(shape, self.ratio, self.generator, device)

    def shift_mask(self, h: int, w: int, ws: int, shift: int, device: torch.device) -> EdgeShiftMask:
        return self._cached(("shift_mask", h, w, ws, shift, str(device)), lambda: EdgeShiftMask(h, w, ws, shift, device))

    def window_layout(
        self, images: int, h: int, w: int, ws: int, shift: int, device: torch.device, by_kind: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's windows: the token index of each (windows, N) (:func:`window_order`) and
        each one's kind (:func:`window_kinds`), in partition order or sorted by kind."""

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            order = window_order(images, h, w, ws, shift).view(-1, ws * ws)
            kinds = window_kinds(h // ws, w // ws, images, shift > 0)
            if by_kind:
                sort = torch.argsort(kinds, stable=True)
                order, kinds = order[sort], kinds[sort]
            return order.to(device), kinds.to(device)

        return self._cached(("window_layout", images, h, w, ws, shift, str(device), by_kind), make)

    def _cached(self, key: tuple, make):
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
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, shortcut: bool = True
    ) -> torch.Tensor:
        """Denoise ``x``; ``generator`` makes the attention mask reproducible.

        On CPU without autograd, attention takes the masked-token shortcut
        (:meth:`WindowAttention.forward_masked`); on CUDA without autograd, a fused
        kernel (:meth:`WindowAttention.forward_fused`), or under bf16/fp16 autocast one
        Triton kernel per Swin block (:meth:`block_kernel_dtype`). ``shortcut=False`` forces the
        plain computation (the speed reference and the tests that pin them together).
        """
        h, w = x.shape[-2:]
        ws = self.config.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        x = x - self.mean
        ratio = self.config.attn_mask_ratio
        fused = shortcut and x.device.type == "cuda" and not torch.is_grad_enabled()
        chunk = attention_chunk(x.device.type, fused)
        shortcut = shortcut and x.device.type == "cpu" and not torch.is_grad_enabled()
        kernel_dtype = self.block_kernel_dtype(x.device) if fused else None
        ctx = ForwardContext(ratio, generator, self._layout_cache, chunk, shortcut, fused, kernel_dtype)
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

    def block_kernel_dtype(self, device: torch.device) -> torch.dtype | None:
        """Under CUDA autocast to bf16 or fp16, with Triton there and a GPU from Ampere on: the
        one-kernel Swin block (:mod:`mitdenoise.triton_block`) with products in that type. Else
        None: the fused route.

        Measured on an H100 (see README, "On a GPU"). fp32 keeps the fused route: Triton's fp32
        products would be TF32, and fp32 is the precision that must match the authors' outputs.
        """
        if not torch.is_autocast_enabled("cuda") or torch.cuda.get_device_capability(device) < (8, 0):
            return None
        dtype = torch.get_autocast_dtype("cuda")
        if dtype not in (torch.bfloat16, torch.float16):
            return None
        from . import triton_block

        c = self.config
        hidden = int(c.embed_dim * c.mlp_ratio)
        if not triton_block.available() or not all(
            triton_block.supports(c.embed_dim, heads, hidden, c.window_size) for heads in c.num_heads
        ):
            return None
        return dtype


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
