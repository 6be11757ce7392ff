"""Reductions (invariant over permuted axes) and order-dependent ops (which fix the axis)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from permgraph.axes import Reason
from permgraph.infer.context import Args, RuleContext, TType, concrete, norm_dim
from permgraph.infer.registry import family, register

aten = torch.ops.aten


def reduction(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """Reducing over a permuted axis is invariant; kept axes pass through."""
    t = a.t("self")
    dims = a.get("dim")
    if dims is None:
        dims = list(range(len(t)))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {norm_dim(d, len(t)) for d in dims} if len(t) else set()
    keep = bool(a.get("keepdim"))
    out = [(cx.store.new(1) if keep else None) if i in dims else x for i, x in enumerate(t)]
    out = [x for x in out if x is not None]
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        return [list(out) for _ in val]
    return out


def order_dependent(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """Results depend on positions along the axis (cumsum, flip, roll, diff): that axis is fixed."""
    t = a.t("self")
    dims = _order_dims(a.get("dim", a.get("dims")), len(t))
    for d in dims:
        cx.fix(t[d], f"order-dependent op {node.target}")
    return _results(cx, node, t, dims, keep_dim_axis=True)


def ranking(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """Sorting, top-k, max/argmax along an axis: values come out in rank order, so they do not
    depend on how the axis is permuted (rank axes are fixed); indices are positions along the axis
    (index values: permuting the axis relabels them, ``RuleContext.index_with``)."""
    t = a.t("self")
    if a.get("other") is not None:  # max.other / min.other: elementwise
        from permgraph.infer.rules.elementwise import elementwise
        return elementwise(cx, node, a)
    dim = a.get("dim")
    if dim is None and len(t) > 1 and node.target.overloadpacket in (aten.argmax, aten.argmin):
        cx.fix_all(t, f"flat index of {node.target}")  # positions in the flattened tensor
        return cx.fresh(cx.out_shape(), f"flat index of {node.target}")
    dims = _order_dims(dim, len(t))
    res = _results(cx, node, t, dims, keep_dim_axis=False)
    val = node.meta["val"]
    if len(dims) == 1:
        outs = list(val) if isinstance(val, (list, tuple)) else [val]
        atoms = [t[dims[0]] if not v.is_floating_point() and not v.dtype == torch.bool else None for v in outs]
        if any(x is not None for x in atoms):
            cx.set_values(atoms if isinstance(val, (list, tuple)) else atoms[0])
    return res


def _order_dims(dim: Any, ndim: int) -> list[int]:
    if isinstance(dim, (list, tuple)):
        return [norm_dim(d, ndim) for d in dim]
    return list(range(ndim)) if dim is None else [norm_dim(dim, ndim)]


def _results(cx: RuleContext, node: fx.Node, t: TType, dims: list[int], keep_dim_axis: bool) -> Any:
    val = node.meta["val"]
    res = [_order_result(cx, t, dims, tuple(concrete(s) for s in v.shape), keep_dim_axis)
           for v in (val if isinstance(val, (list, tuple)) else [val])]
    return res if isinstance(val, (list, tuple)) else res[0]


def _order_result(cx: RuleContext, t: TType, dims: list[int], shape: tuple[int, ...], keep: bool) -> TType:
    """One result: other axes pass through; along ``dims`` the input's (fixed) axis when ``keep`` and
    the size is unchanged, else a fresh axis in rank order (fixed)."""
    why = Reason("rank order / positions along the axis", cx.where)
    if len(shape) == len(t):
        out = []
        for i, (x, s) in enumerate(zip(t, shape)):
            if i not in dims:
                if cx.store.size(x) != s:
                    break
                out.append(x)
            elif keep and cx.store.size(x) == s:
                out.append(x)
            else:
                out.append(cx.store.new(s, why if s > 1 else None))
        else:
            return out
    kept = [x for i, x in enumerate(t) if i not in dims]
    if len(kept) == len(shape) and all(cx.store.size(x) == s for x, s in zip(kept, shape)):
        return kept
    cx.fix_all(t, "order-dependent op with an unexpected result shape")
    return cx.fresh(shape, "order-dependent result")


@register(aten.tril, aten.triu)
def triangular(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """tril/triu keep entries by their (row, column) position: the last two axes are fixed, the
    leading (batch-like) axes pass through."""
    t = list(a.t("self"))
    for d in t[-2:]:
        cx.fix(d, f"triangular mask ({node.target})")
    return t


def_reduction = family(reduction)
def_order_dependent = family(order_dependent)
def_ranking = family(ranking)

def_reduction(
    aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.linalg_vector_norm, aten.norm,
    aten.linalg_norm,  # vector and matrix norms: invariant under permutations of the reduced axes
    aten.logsumexp, aten.prod, aten.all, aten.any, aten.var_mean, aten.std_mean, aten.nansum, aten.nanmean,
    aten._is_all_true, aten._is_any_true,
)
def_ranking(
    aten.max, aten.min, aten.argmax, aten.argmin, aten.sort, aten.topk, aten.kthvalue, aten.median, aten.mode,
    aten.argsort,
)
def_order_dependent(
    aten.cumsum, aten.cumprod, aten.cummax, aten.cummin, aten.flip, aten.roll, aten.diff,
)


_FFT_1D = (aten.fft_fft, aten.fft_ifft, aten.fft_rfft, aten.fft_irfft, aten.fft_hfft, aten.fft_ihfft)
_FFT_2D = (aten.fft_fft2, aten.fft_ifft2, aten.fft_rfft2, aten.fft_irfft2)


@register(*_FFT_1D, *_FFT_2D, aten.fft_fftn, aten.fft_ifftn, aten.fft_rfftn, aten.fft_irfftn,
          aten._fft_r2c, aten._fft_c2r, aten._fft_c2c)
def fourier(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """A discrete Fourier transform mixes the positions along each transformed axis by their order:
    those axes are fixed (the result's are fresh where ``n``/``s``/one-sidedness resizes them); the
    others pass. The transformed dims: ``dim``; else the last one (1-D transforms), the last two
    (``*fft2``), the last ``len(s)`` or all (``*fftn``)."""
    t = a.t("self")
    dim, s, packet = a.get("dim"), a.get("s"), node.target.overloadpacket
    if dim is not None:
        dims = _order_dims(dim, len(t))
    elif packet in _FFT_1D:
        dims = [len(t) - 1]
    elif packet in _FFT_2D:
        dims = [len(t) - 2, len(t) - 1]
    else:
        dims = list(range(len(t) - len(s) if s else 0, len(t)))
    for d in dims:
        cx.fix(t[d], f"Fourier transform along the axis ({node.target})")
    return _results(cx, node, t, dims, keep_dim_axis=True)


@register(aten.mse_loss, aten.l1_loss, aten.smooth_l1_loss, aten.huber_loss)
def pointwise_loss(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``loss(x, y) = reduce_i l(x_i - y_i)``: elementwise in ``(x, y)``, then (unless ``reduction`` is
    none) a mean or sum over all entries, invariant under any permutation of them: the operands' axes
    unify as under broadcasting and the result is a scalar."""
    from permgraph.infer.rules.elementwise import elementwise
    if a.get("reduction", 1) == 0:
        return elementwise(cx, node, a)
    x, y = a.t("self"), a.t("target")
    ux, uy = cx.uniform_dims(a["self"]), cx.uniform_dims(a["target"])
    for k in range(1, min(len(x), len(y)) + 1):  # aligned from the right, like broadcasting
        i, j = len(x) - k, len(y) - k
        if i not in ux and j not in uy and cx.store.size(x[i]) == cx.store.size(y[j]) != 1:
            cx.unify(x[i], y[j])
    return []


def spatial(cx: RuleContext, node: fx.Node, a: Args) -> Any:
    """Pooling and upsampling: the last k (spatial) axes are positions (fixed, fresh in the result);
    batch and channel axes pass through. k comes from the op's name (``..2d`` -> 2)."""
    t = a.t("self") if "self" in a else a.t("input")
    name = node.target.overloadpacket.__name__
    k = next((int(c) for c in ("1", "2", "3") if f"{c}d" in name), 2)
    for x in t[len(t) - k:]:
        cx.fix(x, f"spatial positions ({name})")
    val = node.meta["val"]
    outs = list(val) if isinstance(val, (list, tuple)) else [val]
    res = []
    for v in outs:
        shape = tuple(concrete(s) for s in v.shape)  # sizes known only at run time too (SigLIP 2's resize)
        res.append(list(t[: len(t) - k]) + cx.fresh(shape[len(t) - k:], f"spatial positions ({name})"))
    return res if isinstance(val, (list, tuple)) else res[0]


@register(aten.grid_sampler, aten.grid_sampler_2d, aten.grid_sampler_3d)
def grid_sample(cx: RuleContext, node: fx.Node, a: Args) -> TType:
    """``input (N, C, *spatial_in)`` sampled at ``grid (N, *spatial_out, k)``: every channel with the
    same spatial weights, so the channel axis passes; the batch axes unify; input positions and the
    grid's coordinates are fixed; the result's spatial axes are the grid's."""
    t, g = a.t("input"), a.t("grid")
    why = f"spatial positions ({node.target})"
    for x in t[2:] + g[-1:]:
        cx.fix(x, why)
    if cx.store.size(t[0]) == cx.store.size(g[0]):
        cx.unify(t[0], g[0])
    else:
        cx.fix(t[0], why)
        cx.fix(g[0], why)
    return [t[0], t[1]] + list(g[1:-1])


family(spatial)(
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool1d,
    aten.adaptive_max_pool2d, aten.adaptive_max_pool3d, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
    aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_linear1d,
    aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d, aten._upsample_nearest_exact2d,
    aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa, aten._upsample_nearest_exact1d,
    aten._upsample_nearest_exact3d,
)
