"""The Lipschitz constant of a data set (docs/method.md, "Lipschitz constant of a data set").

With one-hot labels ``c(x)`` and pixels in [0, 1], from l2 inputs to l-infinity outputs,

    L_data = max ||c(x1) - c(x2)||_inf / ||x1 - x2||_2   over differently labelled pairs
           = 1 / (smallest l2 distance between two differently labelled images).

Exact duplicates with different labels (distance 0) are label noise: they are counted and
excluded. ``smallest_distance`` computes the distance exactly (see its docstring for the
proof) in blocks, so memory grows with the block, not with N^2; ``data_constant`` applies it
to a data set's training split (pairs within it) or test split (test against training
images). The command ``lipexp lipschitz data`` (compose the config, load the images, compute,
write a JSON file) is lipexp.lipschitz.data_constant_cli.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lipexp.data.datamodule import to_unit
from lipexp.data.sources import ImageArrays
from lipexp.precision import tf32_off

U32 = 2.0**-24  # unit roundoff of float32
# bytes of float32 distances per block; the rows whose candidates need an exact check add a
# few float64 copies of their own (proportional to the block too: see _screen)
DEFAULT_MEMORY = 512 * 2**20
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Result:
    """The smallest l2 distance between differently labelled, non-identical images.

    Indices are the rows of the inputs as given: ``pair = (i, j)`` with ``i < j`` within one
    set, or ``(index in a, index in b)`` across two sets. With no such pair, ``distance`` is
    inf, ``constant`` 0 and ``pair`` None.
    """

    distance: float  # l2, pixels in [0, 1]
    squared_distance: float
    constant: float  # 1 / distance: the data's Lipschitz constant (l2 -> l-infinity)
    pair: tuple[int, int] | None  # the first pair (in index order) at that distance
    labels: tuple[int, int] | None  # the pair's labels
    ties: int  # number of pairs at exactly this distance (1: the pair is unique)
    duplicates: int  # pairs of identical images with different labels (excluded)
    duplicate_examples: tuple[tuple[int, int], ...]  # the first 10 in index order
    pairs: int  # differently labelled pairs examined
    candidates: int  # pairs recomputed exactly after the float32 screen
    exact: str  # arithmetic of the recomputation: "int64" (uint8 pixels) or "float64"
    block: int  # rows per block
    device: str


def _flat(x: Tensor, labels: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Images as (N, D) (uint8 kept, other dtypes must be floating) and labels as int64 (N,)."""
    x = torch.as_tensor(x)
    labels = torch.as_tensor(labels).reshape(-1)
    if x.ndim == 0 or len(x) != len(labels):
        raise ValueError(f"{name}: {len(labels)} labels for images of shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"{name}: images must be uint8 (0..255) or floating point in [0, 1], "
                         f"got {x.dtype}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name}: labels must be integers, got {labels.dtype}")
    x = x.reshape(len(x), -1)
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name}: images contain NaN or infinite values")
    return x, labels.long()


def _squared_norms(x32: Tensor, chunk: int) -> Tensor:
    """float64 squared norms of the float32 rows (each square exact, the sum to ~D 2^-53)."""
    parts = [x32[s:s + chunk].double().pow(2).sum(1) for s in range(0, len(x32), chunk)]
    return torch.cat(parts) if parts else x32.new_zeros(0, dtype=torch.float64)


def _round_up32(t: Tensor) -> Tensor:
    """The smallest float32 >= each float64 value: for float32 g, g <= t iff g <= result."""
    r = t.float()
    low = r.double() < t
    return torch.where(low, torch.nextafter(r, r.new_full((), math.inf)), r)


def _block_rows(block: int | None, columns: int, memory: int) -> int:
    """Rows per block: ``block``, or as many as keep the float32 distance block and the
    candidate rows' copy (at most as large) within ``memory`` bytes."""
    if block is not None:
        if block < 1:
            raise ValueError(f"block must be >= 1 rows, got {block}")
        return int(block)
    return max(1, memory // (2 * 4 * max(columns, 1)))


def smallest_distance(
    a: Tensor,
    labels_a: Tensor,
    b: Tensor | None = None,
    labels_b: Tensor | None = None,
    *,
    block: int | None = None,
    device: str | torch.device | None = None,
    memory: int = DEFAULT_MEMORY,
) -> Result:
    """The smallest l2 distance between differently labelled images, exactly.

    ``a`` (N, ...) with ``labels_a`` (N,): pairs i < j within ``a`` when ``b`` is None, else
    every pair of ``a`` x ``b`` (``b`` (M, ...) with ``labels_b``). Images are uint8 (pixel /
    255) or floating point (pixels in [0, 1]). Pairs of identical images (distance exactly
    0) with different labels are duplicates: counted, listed (the first 10) and excluded.
    ``block``: rows of ``a`` per block (default: as many as fit ``memory`` bytes, about two
    float32 (block x columns) matrices); ``device``: default cuda when available, else cpu.

    Method. The images are sorted by label, so that the differently labelled columns of a
    row of label c are contiguous: within one set, rows of label c only meet the later
    labels (each unordered pair once, no mask, no same-label work); across two sets, the
    columns before and after label c. Per block of rows and range of columns, a float32
    matrix product gives ``g_ij = n_i + n_j - 2 a_i.b_j``, with ``n`` the float32 squared
    norms; a few candidates per block are recomputed exactly, in int64 on the uint8 pixels
    (the squared distance times 255^2 is an integer) or in float64 from the given values by
    direct differences, and the smallest nonzero one is kept.

    Error bound. Let d_ij^2 be the exact squared distance and S_ij = |a_i|^2 + |b_j|^2.
    Rounding the images to float32 moves d_ij^2 by at most 2u(2+u) S_ij (u = 2^-24; each
    pixel moves by at most u times itself). The float32 product sums D + 1 terms
    (n_j and the D products -2 a_ik b_jk) in whatever order and blocking the BLAS chooses,
    with or without FMA: error at most gamma_(D+1) (n_j + 2 |a_i| |b_j|) <= 2 gamma_(D+1) S_ij,
    gamma_k = k u / (1 - k u); the float64 norms rounded to float32 and the final addition
    of n_i add at most a few u S_ij. In total |g_ij - d_ij^2| <= e_ij with
    e_ij <= (2 (D + 1) + 10) u S_ij (first order), and the margin used is twice that,
    m_i = 4 (D + 16) u (|a_i|^2 + max_j |b_j|^2) >= e_ij for every column j of the block,
    so also float64 rounding of the bounds below (relative 2^-53) is absorbed. It needs full
    float32 products: ``lipexp.precision.tf32_off`` turns TF32 off for the duration.

    Exactness. Let U be the smallest nonzero exact squared distance recomputed so far (inf at
    first): it is the true value of some differently labelled, non-identical pair, so
    U >= d*^2, the answer. In each block, a row whose smallest g exceeds m_i has only
    nonzero pairs (d^2 >= g - e > 0), and its smallest pair has d^2 <= min_j g_ij + m_i; for
    the few other rows the same bound comes from their entries above m_i. So
    T = min(U, the block's smallest such bound) >= d*^2, again the true value of a pair or
    above. Every pair of the block with g_ij <= T + m_i is recomputed exactly. A pair p* at
    the smallest distance has g <= d*^2 + e <= T + m_i: it is always recomputed (as is
    every pair at that distance, which makes ``ties`` exact). Every identical pair has
    g <= e <= T + m_i: every duplicate is recomputed, seen to be exactly 0 and counted.
    The float32 screen therefore only decides how many pairs are recomputed, never the
    answer; the reported distance, pair and counts come from exact arithmetic, and ties
    are broken by index order, so the result does not depend on the block size or device.
    """
    within = b is None
    if within != (labels_b is None):
        raise ValueError("give b and labels_b together (or neither: pairs within a)")
    dev = torch.device(device if device is not None else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    xa, ya = _flat(a, labels_a, "a")
    xb, yb = (xa, ya) if within else _flat(b, labels_b, "b")
    if xa.shape[1] != xb.shape[1]:
        raise ValueError(f"a and b differ in pixels per image: {xa.shape[1]} vs {xb.shape[1]}")
    dim = xa.shape[1]
    integer = xa.dtype == torch.uint8 and xb.dtype == torch.uint8
    rows = _block_rows(block, len(xb), memory)

    # sorted by label (stable: ties keep their order), float32 on the device
    perm_a = torch.argsort(ya, stable=True)
    perm_b = perm_a if within else torch.argsort(yb, stable=True)
    ya_s, yb_s = ya[perm_a], yb[perm_b]
    exact_a = xa.to(dev)  # as given (uint8 or float), indexed by original indices
    exact_b = exact_a if within else xb.to(dev)
    fa = to_unit(xa[perm_a].to(dev))
    fb = fa if within else to_unit(xb[perm_b].to(dev))
    chunk = max(1, 2**22 // max(dim, 1))
    na64 = _squared_norms(fa, chunk)
    nb64 = na64 if within else _squared_norms(fb, chunk)
    na32, nb32 = na64.float(), nb64.float()
    rel = 4.0 * (dim + 16) * U32
    perm_a_dev, perm_b_dev = perm_a.to(dev), perm_b.to(dev)

    state = _Best(integer=integer, n_b=len(xb))
    pairs = 0
    with tf32_off(dev), torch.no_grad():
        for r0, r1, c0, c1 in _units(ya_s, yb_s, within, rows):
            pairs += (r1 - r0) * (c1 - c0)
            cand_r, cand_c = _screen(fa[r0:r1], fb[c0:c1], na32[r0:r1], nb32[c0:c1],
                                     na64[r0:r1], nb64[c0:c1], rel, state.upper())
            if len(cand_r) == 0:
                continue
            i = perm_a_dev[cand_r + r0]
            j = perm_b_dev[cand_c + c0]
            if within:  # report unordered pairs as (smaller, larger) index
                i, j = torch.minimum(i, j), torch.maximum(i, j)
            state.add(i, j, _exact_squared(exact_a, exact_b, i, j, integer, chunk))

    if state.key is None:
        distance, pair, labels = math.inf, None, None
    else:
        pair = state.pair
        labels = (int(ya[pair[0]]), int(yb[pair[1]]))
        distance = math.sqrt(state.squared())
    return Result(
        distance=distance,
        squared_distance=distance**2 if state.key is None else state.squared(),
        constant=0.0 if math.isinf(distance) else 1.0 / distance,
        pair=pair,
        labels=labels,
        ties=state.ties,
        duplicates=state.duplicates,
        duplicate_examples=tuple(state.duplicate_examples),
        pairs=pairs,
        candidates=state.candidates,
        exact="int64" if integer else "float64",
        block=rows,
        device=str(dev),
    )


def _units(ya: Tensor, yb: Tensor, within: bool, rows: int):
    """``(r0, r1, c0, c1)``: blocks of at most ``rows`` rows of one label in sorted ``ya``
    and a range of sorted ``yb`` columns of other labels; every differently labelled pair
    (unordered within one set) lies in exactly one of them."""
    values, counts = torch.unique_consecutive(ya, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [e - c for e, c in zip(ends, counts.tolist(), strict=True)]
    lows = torch.searchsorted(yb, values, right=False).tolist()
    highs = torch.searchsorted(yb, values, right=True).tolist()
    for s, e, lo, hi in zip(starts, ends, lows, highs, strict=True):
        segments = [(hi, len(yb))] if within else [(0, lo), (hi, len(yb))]
        for c0, c1 in segments:
            if c1 > c0:
                for r0 in range(s, e, rows):
                    yield r0, min(r0 + rows, e), c0, c1


def _screen(fa: Tensor, fb: Tensor, na32: Tensor, nb32: Tensor, na64: Tensor, nb64: Tensor,
            rel: float, upper: float) -> tuple[Tensor, Tensor]:
    """Local (row, column) indices of the block's pairs that must be recomputed exactly:
    ``g <= T + m_i`` (see ``smallest_distance``)."""
    # g - n_i: float32 (rows x columns); n_i is added per row, where needed (rounding is
    # monotone, so fl(min_j (g_ij - n_i) + n_i) = min_j fl(g_ij - n_i + n_i) = min_j g_ij)
    g = torch.addmm(nb32.unsqueeze(0), fa, fb.T, alpha=-2.0)
    row_min = (g.amin(1) + na32).double()
    margin = rel * (na64 + nb64.max())
    sure = row_min > margin  # no identical pair in the row
    bound = torch.where(sure, row_min + margin, math.inf)  # >= the row's smallest d^2
    unsure = torch.nonzero(~sure).squeeze(1)
    if len(unsure):  # rows with a possibly identical pair: the bound from entries above m_i
        gu = g[unsure] + na32[unsure].unsqueeze(1)
        above = torch.where(gu.double() > margin[unsure].unsqueeze(1), gu.double(), math.inf)
        bound[unsure] = above.amin(1) + margin[unsure]
    threshold = torch.clamp(bound.min(), max=upper) + margin  # T + m_i, float64
    keep = torch.nonzero(row_min <= threshold).squeeze(1)
    if len(keep) == 0:
        return keep, keep
    gk = g[keep] + na32[keep].unsqueeze(1)
    r, c = torch.nonzero(gk <= _round_up32(threshold[keep]).unsqueeze(1), as_tuple=True)
    return keep[r], c


def _exact_squared(xa: Tensor, xb: Tensor, i: Tensor, j: Tensor, integer: bool,
                   chunk: int) -> Tensor:
    """Exact squared distances of pairs (xa[i], xb[j]): int64 sums of squared uint8
    differences (units of 1/255^2), or float64 direct differences."""
    out = []
    for s in range(0, len(i), chunk):
        ii, jj = i[s:s + chunk], j[s:s + chunk]
        if integer:
            diff = xa[ii].to(torch.int32) - xb[jj].to(torch.int32)
            out.append((diff * diff).sum(1, dtype=torch.int64))
        else:
            out.append((to_unit(xa[ii], torch.float64)
                        - to_unit(xb[jj], torch.float64)).pow(2).sum(1))
    return torch.cat(out)


class _Best:
    """The running exact minimum over recomputed candidates: smallest key, first pair in
    index order among the ties, tie count, duplicates."""

    def __init__(self, integer: bool, n_b: int) -> None:
        self.integer = integer
        self.n_b = max(n_b, 1)
        self.key: int | float | None = None
        self.code: int | None = None  # i * n_b + j of the reported pair
        self.ties = 0
        self.duplicates = 0
        self.duplicate_examples: list[tuple[int, int]] = []
        self.candidates = 0

    def squared(self) -> float:
        """The key as a squared distance, pixels in [0, 1]."""
        return self.key / 255.0**2 if self.integer else float(self.key)

    def upper(self) -> float:
        return math.inf if self.key is None else self.squared()

    @property
    def pair(self) -> tuple[int, int]:
        return divmod(self.code, self.n_b)

    def add(self, i: Tensor, j: Tensor, keys: Tensor) -> None:
        self.candidates += len(keys)
        codes = i * self.n_b + j
        zero = keys == 0
        if zero.any():
            self.duplicates += int(zero.sum())
            first = torch.sort(codes[zero]).values[:10].tolist()
            merged = sorted({*(x * self.n_b + y for x, y in self.duplicate_examples), *first})
            self.duplicate_examples = [divmod(c, self.n_b) for c in merged[:10]]
            keys, codes = keys[~zero], codes[~zero]
        if len(keys) == 0:
            return
        low = keys.min()
        at = keys == low
        key = int(low) if self.integer else float(low)
        code = int(codes[at].min())
        if self.key is None or key < self.key:
            self.key, self.code, self.ties = key, code, int(at.sum())
        elif key == self.key:
            self.code, self.ties = min(self.code, code), self.ties + int(at.sum())


def data_constant(arrays: ImageArrays, split: str = "train", **kwargs) -> Result:
    """``split="train"``: pairs of training images; ``"test"``: each test image (index in
    the test split first) against the training images. ``kwargs``: ``smallest_distance``'s."""
    if split == "train":
        return smallest_distance(arrays.train_x, arrays.train_y, **kwargs)
    if split == "test":
        return smallest_distance(arrays.test_x, arrays.test_y, arrays.train_x, arrays.train_y,
                                 **kwargs)
    raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
