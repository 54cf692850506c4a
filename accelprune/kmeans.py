"""k-means for C-SGD at LLM scale: torch, GEMM distances, on the data's device; scipy reference.

C-SGD splits each channel group's n filters (rows of d numbers) into k clusters. An LLaMA-7B MLP
group is 11008 rows of 4096 into 5504 clusters: scipy's float64 ``kmeans2`` takes minutes per
group there, and the exact k-means++ seeding alone needs k sequential passes over the n·d data.
:func:`kmeans` does the same job with a few large matrix products.

What it computes (the decisions, so that a result can be reproduced from this text):

* **Seeding: k-means++ in at most ``init_rounds`` rounds** (:func:`kmeans_seeds`). The first seed
  is row ``rng.integers(n)`` with ``rng = numpy.random.default_rng(seed)``; then each round picks
  ``ceil((k - 1) / init_rounds)`` seeds one after the other from the D² distribution (one
  ``rng.uniform()`` per pick against the cumulative normalised weights, as scipy's ``_kpp``),
  where D² is the squared distance to the nearest seed *as of the start of the round*, and a
  picked row's weight drops to 0 at once (no row is picked twice). One matrix product per round
  then updates D². With ``init_rounds >= k - 1`` (the default 16 covers every k <= 17) this is
  exactly scipy's k-means++ (``kmeans2(minit="++")``) draw for draw; for larger k it is a
  blocked k-means++ in the spirit of k-means|| (Bahmani et al., 2012: sample many centres per
  pass from D², here exactly k picks in all and no reclustering step). Its cost is one pass of
  n·k·d, like one Lloyd iteration, in ``init_rounds`` GEMMs wide enough to run at full speed.
  Quality: on 3072 x 768 rows into 1536 clusters (1200 noisy true centres), the inertia after
  Lloyd was within 3 % of exact k-means++ for 8 to 128 rounds and 12 % worse for 4 rounds; on
  Gaussian noise the rounds make no difference (within 0.2 %).
  Rows whose D² is within the float32 rounding bound of 0 (see below) count as already covered
  (weight 0): when all weights are 0 (fewer than k distinct rows) seeding stops early and the
  missing clusters are made by the repair below.
* **Lloyd iterations**, at most ``iters``: centres = float32 means of their rows (summed in a
  fixed order: deterministic), every row to its nearest centre. Distances are
  ``||x||² - 2 x·c + ||c||²`` with float32 GEMMs over blocks of ``batch_size`` rows (memory
  bounded by the block: ``batch_size × k`` floats). Only the centres whose members changed move,
  so an iteration computes distances to those (``n × moved``) and falls back to all ``k`` only
  for the rows whose stored lower bound on their other centres does not settle the argmin
  (Hamerly-style bounds; exact, not an approximation). It stops early when no row changes
  cluster, or when the inertia falls by less than ``tol`` (relative) in an iteration.
  ``iters`` counts centre updates after the seeds' assignment (scipy's ``kmeans2(iter=T)``
  counts assignments: it is ``iters = T - 1`` here). Why the default of at most 10 is enough:
  C-SGD only needs a good starting partition (training then pulls each cluster together), and
  on the transformer-sized groups measured (random filters, 3072 x 768 -> 1536 and
  11008 x 4096 -> 5504) Lloyd reaches its fixed point after 1 update (no row moves; inertia
  within 0.02 % of scipy's 10 iterations from exact k-means++); on clustered synthetic data it
  took 2 to 3. The cap only bounds the worst case, and later iterations are cheap (few centres
  move). The GEMMs run on a centred copy of the data (minus its mean row) so that a large
  common part of the rows does not swamp the distances; the memory is then about
  2·n·d + 2·k·d floats (data, centred copy, centres in both frames) plus one distance block.
* **Assignments are exact, hence deterministic.** A float32 GEMM distance is within
  ``b(x) = 1.01 (γ_d + 8u)(||x'|| + max||c'||)²`` of the exact value (x', c': centred; u = 2⁻²⁴,
  γ_d = d·u/(1 - d·u), Higham's bound for any summation order, 4u for the norms and sums, 2u
  for the centring's roundings, rounded up; larger under TF32/bf16 matmul precision, which
  :func:`torch.get_float32_matmul_precision` tells). Where the best centre is not ahead of every
  other by more than 2·b(x), the candidate centres within 2·b(x) are compared on float64 distances
  ``sum((x - c)²)`` (lowest centre index on equal distances). So each row goes to the float64
  nearest centre whatever the BLAS, thread count or device: labels do not depend on GEMM rounding.
  The seeding's D² weights do come from float32 GEMMs: its picks are reproducible where the GEMM
  is (torch's CPU BLAS gives bitwise-equal products with 1 or 2 threads, tested; cuBLAS on one GPU).
* **Exactly k non-empty clusters.** After each assignment, the clusters left empty are refilled
  by the rows farthest from their centre (float32 ``sum((x - c)²)``, deterministic; largest first,
  lowest row index on ties), never taking the last row of a cluster; each becomes a singleton.
  This is the :func:`split_until_k` rule done for all empty clusters at once,
  with distances to the current centres instead of recomputed means.
* Labels are numbered by first appearance (row 0 in cluster 0, ...), as everywhere in accelprune;
  ``k == n`` gives ``arange(n)`` and ``k == 1`` zeros, without iterating.

:func:`kmeans_ref` is the reference: the same seeds (:func:`kmeans_seeds`), then scipy's float64
``kmeans2(minit="matrix", iter=iters + 1)``, then the one-row-at-a-time split repair. Where
scipy leaves no cluster empty both give the same partition (tests pin it, ties included);
otherwise Lloyd's local optima differ (scipy keeps an empty cluster's old centre, this module
refills it) and the inertias are compared. ``kmeans(X, k, seed=s, init_rounds=k - 1, iters=9,
tol=0)`` is :func:`accelprune.selection.cluster_filters` with ``backend="reference"`` (exact
k-means++ with scipy's draws, ``kmeans2``'s default 10 assignments) on such data.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import numpy as np
import torch

from accelprune._validation import check_int
from accelprune.cluster import relabel_first_appearance

__all__ = ["KMeansResult", "kmeans", "kmeans_fit", "kmeans_seeds", "kmeans_ref", "split_until_k"]

_U32 = 2.0 ** -24           # float32 unit roundoff
_BLOCK_BYTES = 1 << 28      # default memory for one block of distances (256 MiB)
_FULL_PASS_FRACTION = 0.5   # more centres than this moved: recompute all distances


@dataclasses.dataclass
class KMeansResult:
    """What :func:`kmeans_fit` found."""
    labels: np.ndarray       # (n,) int64 in 0..k-1, numbered by first appearance, all k used
    centres: torch.Tensor    # (k, d) float32 on the data's device: the mean of each cluster
    inertia: float           # sum of squared distances of the rows to their centre
    n_iter: int              # Lloyd iterations run (centre updates)
    converged: bool          # True if it stopped because nothing changed or by ``tol``
    seeds: np.ndarray        # (k',) int64 row indices of the k-means++ seeds, in pick order


# ---------------------------------------------------------------------------------------------
# input checks


def _points(X, device) -> torch.Tensor:
    """X (n, d) as a float32 C-contiguous tensor on ``device`` (a copy only where needed)."""
    if isinstance(X, np.ndarray):
        if not np.issubdtype(X.dtype, np.floating):
            raise TypeError(f"X must be a floating-point array, got dtype {X.dtype}")
        if X.size and not np.isfinite(X).all():
            raise ValueError("X contains NaN or Inf")
        if X.size and np.abs(X).max() > np.finfo(np.float32).max:
            raise ValueError("X has values beyond float32's range; rescale the data")
        # any strides, byte order or float width: one float32 C-contiguous array (or X itself)
        X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    elif not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor or numpy array, got {type(X).__name__}")
    if not X.dtype.is_floating_point:
        raise TypeError(f"X must be a floating-point tensor, got dtype {X.dtype}")
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D (n rows, d features), got shape {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty (shape {tuple(X.shape)}); nothing to cluster")
    out = X.detach().to(device=device, dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise ValueError("X contains NaN or Inf (or values beyond float32's range)")
    return out


def _n_clusters(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of rows), got {k}")
    return int(k)


def _options(seed, iters, tol, init_rounds, batch_size):
    seed = check_int(seed, "seed", low=0)
    iters = check_int(iters, "iters", low=0)
    init_rounds = check_int(init_rounds, "init_rounds", low=1)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size", low=1)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (
            math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return seed, iters, float(tol), init_rounds, batch_size


# ---------------------------------------------------------------------------------------------
# distances and their error bound


class _Geometry:
    """The data, the k centres, and the float32 error bound of GEMM distances between them.

    The GEMMs run on a centred copy of the data (X minus its float32 mean row; k-means does not
    care about a translation) so that ||x||² and x·c do not swamp the distances when the rows
    share a large common part. Everything exact (means, float64 tie-breaks, spreads) uses X.
    """

    def __init__(self, X: torch.Tensor, k: int, batch_size: int | None, width: int):
        n, d = X.shape
        self.X = X
        shift = torch.stack([X[s:s + 4096].double().sum(0) for s in range(0, n, 4096)]).sum(0)
        self.shift = (shift / n).float()
        self.Xg = X - self.shift                                     # centred, for the GEMMs
        self.xx = (self.Xg * self.Xg).sum(1)                         # float32 ||x'||²
        self.norm = torch.cat([torch.linalg.vector_norm(self.Xg[s:s + 4096].double(), dim=1)
                               for s in range(0, n, 4096)])          # float64 ||x'||
        self.C = torch.zeros(k, d, dtype=torch.float32, device=X.device)
        self.Cg = torch.zeros_like(self.C)
        self.cc = torch.zeros(k, dtype=torch.float32, device=X.device)
        gamma = d * _U32 / (1 - d * _U32)
        # TF32 ("high") or bf16 ("medium") matmuls round their inputs: two roundings per product
        gamma += {"highest": 0.0, "high": 2.0 ** -10, "medium": 2.0 ** -7}.get(
            torch.get_float32_matmul_precision(), 2.0 ** -7)
        # GEMM form (γ_d + 4u) plus the centring's roundings of x' and c' (2u, rounded up)
        self.gamma = 1.01 * (gamma + 8 * _U32)
        self.cmax = float(self.norm.max())                           # grows if a centre is longer
        self.rows = batch_size or max(1, min(n, _BLOCK_BYTES // (4 * max(width, 1))))

    def bound(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Per-row bound b(x) (float32) on |GEMM distance - exact distance|, any centre."""
        return (self.gamma * (self.norm[rows] + self.cmax) ** 2).float()

    def set_centres(self, ids, values: torch.Tensor) -> None:
        self.C[ids] = values
        self.Cg[ids] = values - self.shift
        g = self.Cg[ids]
        self.cc[ids] = (g * g).sum(1)
        if len(g):
            norm = float(torch.linalg.vector_norm(g.double(), dim=1).max())
            self.cmax = max(self.cmax, norm * (1 + 1e-6))

    def dist(self, rows, ids=None) -> torch.Tensor:
        """float32 (rows, centres ``ids``, default all) distances ||x||² - 2 x·c + ||c||²."""
        Cg, cc = (self.Cg, self.cc) if ids is None else (self.Cg[ids], self.cc[ids])
        D = torch.addmm(cc[None, :], self.Xg[rows], Cg.T, beta=1.0, alpha=-2.0)
        return D.add_(self.xx[rows, None])

    def exact(self, rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """float64 sum((x - c)²) for the pairs (rows[i], centres[i]); each pair on its own."""
        diff = self.X[rows].double() - self.C[centres].double()
        return (diff * diff).sum(1)

    def direct(self, labels: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
        """float32 sum((x - c)²) of every row to its centre (deterministic: no GEMM)."""
        C = self.C if C is None else C
        out = torch.empty(self.X.shape[0], dtype=torch.float32, device=self.X.device)
        for s in range(0, self.X.shape[0], self.rows):
            diff = self.X[s:s + self.rows] - C[labels[s:s + self.rows]]
            out[s:s + self.rows] = (diff * diff).sum(1)
        return out

    def inertia(self, labels: torch.Tensor, C: torch.Tensor | None = None) -> float:
        return float(self.direct(labels, C).double().cpu().numpy().sum())  # numpy: fixed order


def _settle(geo: _Geometry, rows, D: torch.Tensor, ids: torch.Tensor | None):
    """Nearest centre of each row from approximate distances D (r, m).

    Column j of row i is centre ``ids[i, j]`` (centre j when ``ids`` is None). Rows whose best is
    not ahead by 2·b(x) are decided on float64 distances among the candidates within 2·b(x)
    (lowest centre id on equal distances). Returns (label, best, second best), the distances
    approximate (float32 GEMM values).
    """
    best, arg = D.min(1)
    near = D <= (best + 2 * geo.bound(rows))[:, None]
    tied = (near.sum(1) > 1).nonzero().squeeze(1)
    if len(tied):
        pr, pc = near[tied].nonzero(as_tuple=True)
        centre = pc if ids is None else ids[tied[pr], pc]
        row_ids = tied[pr] + rows.start if isinstance(rows, slice) else rows[tied[pr]]
        exact = geo.exact(row_ids, centre).cpu().numpy()
        pr_np, centre_np = pr.cpu().numpy(), centre.cpu().numpy()
        order = np.lexsort((centre_np, exact, pr_np))      # by row, then distance, then centre
        first = order[np.r_[True, pr_np[order][1:] != pr_np[order][:-1]]]
        arg[tied[torch.as_tensor(pr_np[first], device=D.device)]] = pc[
            torch.as_tensor(first, device=D.device)]
    own = D.gather(1, arg[:, None]).squeeze(1)
    if D.shape[1] > 1:
        second = D.scatter_(1, arg[:, None], math.inf).min(1).values  # D is not needed after
    else:
        second = torch.full_like(own, math.inf)
    label = arg if ids is None else ids.gather(1, arg[:, None]).squeeze(1)
    return label, own, second


# ---------------------------------------------------------------------------------------------
# seeding


def _seed(geo: _Geometry, k: int, seed: int, init_rounds: int):
    """Blocked k-means++ (module docstring): seeds become centres 0..k'-1 of ``geo``.

    Returns (seed rows, label, own, second): each row's nearest seed and the approximate
    distances to its nearest and second-nearest seeds.
    """
    X = geo.X
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    seeds = [int(rng.integers(n, dtype=np.int64))]
    label = torch.zeros(n, dtype=torch.int64, device=X.device)
    own = torch.empty(n, dtype=torch.float32, device=X.device)
    second = torch.full((n,), math.inf, dtype=torch.float32, device=X.device)
    new = seeds
    per_round = -(-(k - 1) // init_rounds)
    while True:
        first_id = len(seeds) - len(new)
        ids = slice(first_id, len(seeds))
        geo.set_centres(ids, X[new])
        for s in range(0, n, geo.rows):
            r = slice(s, s + geo.rows)
            D = geo.dist(r, ids)
            top = D.topk(min(2, D.shape[1]), dim=1, largest=False)
            nb, nl = top.values[:, 0], top.indices[:, 0] + first_id
            ns = top.values[:, 1] if D.shape[1] > 1 else torch.full_like(nb, math.inf)
            if first_id == 0:
                label[r], own[r], second[r] = nl, nb, ns
                continue
            better = nb < own[r]
            second[r] = torch.minimum(torch.maximum(own[r], nb),
                                      torch.minimum(second[r], ns))
            label[r] = torch.where(better, nl, label[r])
            own[r] = torch.minimum(own[r], nb)
        if len(seeds) >= k:
            break
        weights = own.double().cpu().numpy().copy()
        weights[weights <= geo.bound(slice(None)).double().cpu().numpy()] = 0.0  # covered
        weights[seeds] = 0.0
        new = []
        for _ in range(min(per_round, k - len(seeds))):
            total = weights.sum()
            if total <= 0:
                break
            cumulative = (weights / total).cumsum()
            pick = min(int(np.searchsorted(cumulative, rng.uniform())), n - 1)
            new.append(pick)
            weights[pick] = 0.0
        if not new:
            break  # fewer than k distinct rows: the repair makes the other clusters
        seeds += new
    return np.asarray(seeds, dtype=np.int64), label, own, second


def kmeans_seeds(X, k: int, *, seed: int = 0, init_rounds: int = 16, device=None,
                 batch_size: int | None = None) -> np.ndarray:
    """Row indices (k',) of the k-means++ seeds :func:`kmeans` starts from, in pick order.

    k' = k, or fewer when X has fewer than k distinct rows. See the module docstring for the
    blocked seeding; with ``init_rounds >= k - 1`` it is scipy's ``kmeans2(minit="++")`` seeding.
    """
    Xt = _points(X, device)
    k = _n_clusters(k, Xt.shape[0])
    seed, _, _, init_rounds, batch_size = _options(seed, 0, 0.0, init_rounds, batch_size)
    geo = _Geometry(Xt, k, batch_size, -(-(k - 1) // init_rounds) or 1)
    return _seed(geo, k, seed, init_rounds)[0]


# ---------------------------------------------------------------------------------------------
# Lloyd iterations


def _means(geo: _Geometry, labels: torch.Tensor, which: torch.Tensor) -> None:
    """Move centres ``which`` (non-empty clusters) to the float32 mean of their rows, summed in
    row order (deterministic)."""
    X = geo.X
    slot = torch.full((geo.C.shape[0],), -1, dtype=torch.int64, device=X.device)
    slot[which] = torch.arange(len(which), device=X.device)
    rows = (slot[labels] >= 0).nonzero().squeeze(1)        # ascending row order
    pos = slot[labels[rows]]
    counts = torch.bincount(pos, minlength=len(which))
    if X.is_cuda:  # index_add_ uses atomics on CUDA: sum sorted segments instead
        order = torch.argsort(pos, stable=True)
        sums = torch.segment_reduce(X[rows[order]], "sum", lengths=counts, axis=0, unsafe=True)
    else:  # CPU index_add_ adds the rows serially, in index order
        sums = torch.zeros(len(which), X.shape[1], dtype=X.dtype).index_add_(0, pos, X[rows])
    geo.set_centres(which, sums / counts[:, None].to(X.dtype))


def _refill_empty(geo: _Geometry, labels: torch.Tensor, k: int):
    """Refill empty clusters with the rows farthest from their centre (module docstring).

    Returns (refilled cluster ids, donor cluster ids, the moved rows), all int64 tensors.
    """
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().squeeze(1)
    none = torch.empty(0, dtype=torch.int64, device=labels.device)
    if len(empty) == 0:
        return none, none, none
    spread = geo.direct(labels).double().cpu().numpy()
    lab = labels.cpu().numpy()
    order = np.lexsort((np.arange(len(lab)), -spread))        # farthest first, then lowest row
    ordered = lab[order]
    by_cluster = np.argsort(ordered, kind="stable")           # keeps the order within a cluster
    starts = np.r_[0, np.flatnonzero(np.diff(ordered[by_cluster])) + 1]
    rank = np.empty(len(lab), dtype=np.int64)                 # rank of a row within its cluster
    rank[order[by_cluster]] = np.arange(len(lab)) - np.repeat(starts, np.diff(np.r_[starts,
                                                                                  len(lab)]))
    cnt = counts.cpu().numpy()
    eligible = order[rank[order] < cnt[lab[order]] - 1]       # never a cluster's last row
    moved = torch.as_tensor(eligible[:len(empty)], device=labels.device)
    donors = labels[moved].unique()
    labels[moved] = empty
    geo.set_centres(empty, geo.X[moved])
    return empty, donors, moved


def _after_assignment(geo: _Geometry, labels, own, k: int, before) -> torch.Tensor:
    """Refill empty clusters; return the clusters whose members changed (their centres move)."""
    empty, donors, moved = _refill_empty(geo, labels, k)
    if len(moved):
        own[moved] = 0.0  # the row is its centre; ``second`` stays a valid bound on the others
    if before is None:  # after the seeding: every centre becomes a mean
        return torch.arange(k, device=labels.device)
    diff = (labels != before).nonzero().squeeze(1)
    return torch.cat([labels[diff], before[diff], empty, donors]).unique()


def _assign_moved(geo: _Geometry, labels, own, second, moved: torch.Tensor) -> None:
    """Reassign every row after the centres ``moved`` changed (bounds, module docstring)."""
    n = geo.X.shape[0]
    device = geo.X.device
    is_moved = torch.zeros(geo.C.shape[0], dtype=torch.bool, device=device)
    is_moved[moved] = True
    all_rows = torch.arange(n, device=device)
    undecided = []
    for s in range(0, n, geo.rows):
        sl = slice(s, s + geo.rows)
        lab = labels[sl]
        own_col = torch.where(is_moved[lab], math.inf, own[sl])
        D = torch.cat([own_col[:, None], geo.dist(sl, moved)], dim=1)
        best = D.min(1).values
        # the unmoved other centres are all >= second (approx); decided if best wins by 2 b(x)
        sure = best + 2 * geo.bound(sl) < second[sl]
        undecided.append(all_rows[sl][~sure])
        rs = all_rows[sl][sure]
        if len(rs) == 0:
            continue
        ids = torch.cat([lab[sure, None], moved[None, :].expand(len(rs), -1)], dim=1)
        new, o, sec = _settle(geo, rs, D[sure], ids)
        labels[rs], own[rs] = new, o
        second[rs] = torch.minimum(second[rs], sec)
    _assign_full(geo, labels, own, second, torch.cat(undecided))


def _assign_full(geo: _Geometry, labels, own, second, rows: torch.Tensor | None,
                 n_centres: int | None = None) -> None:
    """Nearest centre of ``rows`` (None: all rows) among centres 0..n_centres-1 (None: all)."""
    n = geo.X.shape[0] if rows is None else len(rows)
    ids = None if n_centres is None else slice(0, n_centres)
    for s in range(0, n, geo.rows):
        r = slice(s, s + geo.rows) if rows is None else rows[s:s + geo.rows]
        labels[r], own[r], second[r] = _settle(geo, r, geo.dist(r, ids), None)


def kmeans_fit(X, k: int, *, seed: int = 0, iters: int = 10, tol: float = 1e-4,
               init_rounds: int = 16, device=None,
               batch_size: int | None = None) -> KMeansResult:
    """k-means of the rows of X (n, d) into exactly k non-empty clusters; see :func:`kmeans`."""
    Xt = _points(X, device)
    n = Xt.shape[0]
    k = _n_clusters(k, n)
    seed, iters, tol, init_rounds, batch_size = _options(seed, iters, tol, init_rounds,
                                                         batch_size)
    if k == n or k == 1:
        labels = np.arange(n, dtype=np.int64) if k == n else np.zeros(n, dtype=np.int64)
        C = Xt.clone() if k == n else Xt.double().mean(0, keepdim=True).float()
        diff = Xt.double() - C[torch.as_tensor(labels, device=Xt.device)].double()
        inertia = float((diff ** 2).sum().cpu())
        return KMeansResult(labels, C, inertia, 0, True, np.empty(0, dtype=np.int64))
    geo = _Geometry(Xt, k, batch_size, k)
    seeds, labels, own, second = _seed(geo, k, seed, init_rounds)
    # the seeding kept only the two nearest seeds: rows with a near tie are decided again, among
    # the seeds only (with fewer than k distinct rows the other centres are not set yet)
    tied = (own + 2 * geo.bound(slice(None)) >= second).nonzero().squeeze(1)
    _assign_full(geo, labels, own, second, tied, len(seeds))
    changed = _after_assignment(geo, labels, own, k, None)
    inertia = geo.inertia(labels)
    n_iter, converged = 0, False
    for n_iter in range(1, iters + 1):  # noqa: B007 (n_iter is reported)
        _means(geo, labels, changed)
        before = labels.clone()
        if len(changed) > _FULL_PASS_FRACTION * k:
            _assign_full(geo, labels, own, second, None)
        else:
            _assign_moved(geo, labels, own, second, changed)
        changed = _after_assignment(geo, labels, own, k, before)
        previous, inertia = inertia, geo.inertia(labels)
        if len(changed) == 0 or (tol > 0 and previous - inertia <= tol * inertia):
            converged = True
            break
    if len(changed):
        _means(geo, labels, changed)
    order = relabel_first_appearance(labels.cpu().numpy())
    perm = torch.empty(k, dtype=torch.int64, device=Xt.device)
    perm[torch.as_tensor(order, device=Xt.device)] = labels
    centres = geo.C[perm]
    inertia = geo.inertia(torch.as_tensor(order, device=Xt.device), centres)
    return KMeansResult(order, centres, inertia, n_iter, converged, seeds)


def kmeans(X, k: int, *, seed: int = 0, iters: int = 10, tol: float = 1e-4,
           init_rounds: int = 16, device=None, batch_size: int | None = None) -> np.ndarray:
    """Labels (n,) int64 of the rows of X (n, d) in exactly k non-empty k-means clusters.

    X: a float tensor (any floating dtype, computed in float32) on the device to compute on, or a
        float numpy array (computed on the CPU unless ``device`` says otherwise). Never modified.
    k: the number of clusters, 1 <= k <= n.
    seed: the seeding's ``numpy.random.default_rng`` seed; the result is a function of
        (X, k, seed, iters, tol, init_rounds) only: not of the thread count, ``batch_size`` or
        device (see the module docstring for the one caveat, the seeding's GEMMs).
    iters: at most this many Lloyd iterations after the seeding's assignment (stops earlier when
        no row moves, or the inertia falls by less than ``tol`` relative in one iteration).
    init_rounds: passes the k-means++ seeding may use (exact k-means++ when >= k - 1).
    batch_size: rows per block of distances (default: as many as fit 256 MiB of float32 distances).
    Returns labels numbered by first appearance (row 0 in cluster 0, each cluster's lowest row
    increasing with its id), like :func:`accelprune.selection.cluster_filters`.
    """
    return kmeans_fit(X, k, seed=seed, iters=iters, tol=tol, init_rounds=init_rounds,
                      device=device, batch_size=batch_size).labels


# ---------------------------------------------------------------------------------------------
# reference (scipy)


def kmeans_ref(X, k: int, *, seed: int = 0, iters: int = 10,
               init_rounds: int = 16) -> np.ndarray:
    """The reference: :func:`kmeans_seeds`, scipy's float64 ``kmeans2``, csgd's split repair.

    ``kmeans2(X, X[seeds], iter=iters + 1, minit="matrix")`` (scipy counts assignments, this
    module centre updates: both make iters + 1 assignments) runs every iteration (no tolerance:
    compare with ``kmeans(..., tol=0)``), keeps an empty cluster's old centre, and its labels are
    then split one row at a time until there are k clusters (the row farthest from its cluster's
    mean, among clusters of more than one row, lowest index on ties).
    """
    from scipy.cluster.vq import kmeans2

    Xt = _points(X, "cpu")
    k = _n_clusters(k, Xt.shape[0])
    seed, iters, _, init_rounds, _ = _options(seed, iters, 0.0, init_rounds, None)
    X64 = Xt.double().numpy()
    if k == len(X64):
        return np.arange(k, dtype=np.int64)
    if k == 1:
        return np.zeros(len(X64), dtype=np.int64)
    seeds = kmeans_seeds(Xt, k, seed=seed, init_rounds=init_rounds)
    with warnings.catch_warnings():  # empty clusters are repaired below
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        _, labels = kmeans2(X64, X64[seeds], iter=iters + 1, minit="matrix", missing="warn")
    return relabel_first_appearance(split_until_k(X64, np.asarray(labels, np.int64), k))


def split_until_k(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Move single rows into new clusters until ``labels`` has k non-empty clusters: the row
    farthest from its cluster's mean, among clusters of more than one row (lowest index on
    ties), becomes a cluster of its own. One row at a time (the reference's repair rule)."""
    labels = relabel_first_appearance(labels)
    while labels.max() + 1 < k:
        counts = np.bincount(labels)
        sums = np.zeros((len(counts), X.shape[1]))
        np.add.at(sums, labels, X)
        spread = ((X - (sums / counts[:, None])[labels]) ** 2).sum(axis=1)
        spread[counts[labels] == 1] = -1.0  # a singleton has nothing to give away
        labels[int(np.argmax(spread))] = labels.max() + 1
    return labels
