"""The Centripetal SGD gradient transform (ALGORITHMS.md §4), in place on ``.grad``.

For a param W viewed as (n, F) rows (row = output channel) with gradient G and a clustering of
its rows, C-SGD replaces G, between ``backward()`` and ``optimizer.step()``, by

    G' = M·G + D·W,    M[a, b] = 1/|H| if a, b in one cluster H,    D = (η + ε)·I − ε·M

which is, row by row, ``G'_a = mean_H(G) + η·W_a + ε·(W_a − mean_H(W))``. The dense form costs
O(n²·F) and is kept only as a reference (:func:`csgd_transform_dense_ref`, the benchmark
baseline). Everything else works on the O(n·F) segment form, rewritten as

    G'_a = mean_H(G − ε·W) + (η + ε)·W_a

so one segmented mean (of G − ε·W) is enough. Paths:

* ``"triton"``: one fused launch over all params (per dtype present), from a :class:`CSGDPlan`'s
  index tables (rows grouped by cluster);
* the fused CPU pass (Numba, :mod:`._cpu_kernels`): one visit of each cluster's rows, W and G
  read once and G written once (``backend="auto"`` on the CPU);
* ``"reference"``: the same segment form with ``index_add_`` / ``index_select`` per param, in
  torch (any device; the CPU path where Numba is missing);
* :func:`csgd_transform_ref`: a readable loop over clusters; :func:`csgd_transform_dense_ref`.

NaN/Inf in gradients are *not* rejected: they propagate into G' as they would through the
optimizer, so mixed-precision training (``GradScaler``) still sees them and skips the step.
"""
from __future__ import annotations

import numbers
import threading

import numpy as np
import torch

from accelprune._backend import thread_count
from accelprune._validation import as_int_array
from accelprune.kernels import _cpu_kernels as _cpu
from accelprune.kernels._common import (
    FLOAT_DTYPES,
    acc_dtype,
    check_float_tensor,
    common_device,
    device_context,
    per_param_coefficient,
    rows_dense,
    same_layout,
    select_backend,
    upload_int64,
)

__all__ = [
    "CSGDPlan",
    "csgd_transform_",
    "csgd_transform_ref",
    "csgd_transform_dense_ref",
]


# ---------------------------------------------------------------------------------------------
# the plan: cluster index structures, built once per clustering


class CSGDPlan:
    """The clusters of a list of params, preprocessed once for :func:`csgd_transform_`.

    The C-SGD pipeline applies the transform at every step while the clusters stay fixed, so
    the label renumbering, cluster sizes and the Triton index tables are computed here once
    (device copies are made lazily, on first use per device) instead of at every call.

    Args:
        params: the params (or their shapes), each (n, ...) with n rows = output channels.
        clusters: one 1-D integer array per param, length n, values >= 0 (any numbering; need
            not be contiguous). Tensors (any device), numpy arrays or lists.
    """

    def __init__(self, params, clusters):
        if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
            raise TypeError(f"params must be a list or tuple, got {type(params).__name__}")
        if len(params) == 0:
            raise ValueError("params is empty; pass at least one param")
        if isinstance(clusters, torch.Tensor) or not isinstance(clusters, (list, tuple)):
            raise TypeError("clusters must be a list or tuple with one 1-D integer array per "
                            f"param, got {type(clusters).__name__}")
        if len(clusters) != len(params):
            raise ValueError(f"got {len(clusters)} cluster arrays for {len(params)} params")
        self.shapes = [tuple(p.shape) if isinstance(p, torch.Tensor) else tuple(p) for p in params]
        self.labels: list[np.ndarray] = []  # per param: (n,) int64 cluster ids 0..k-1
        self.sizes: list[np.ndarray] = []  # per param: (k,) int64 cluster sizes
        for i, (shape, c) in enumerate(zip(self.shapes, clusters, strict=True)):
            if len(shape) == 0 or int(np.prod(shape)) == 0:
                raise ValueError(f"params[{i}] must be non-empty with at least one dimension, "
                                 f"got shape {shape}")
            ids = _cluster_ids(c, f"clusters[{i}]")
            if len(ids) != shape[0]:
                raise ValueError(f"clusters[{i}] has {len(ids)} entries but params[{i}] has "
                                 f"{shape[0]} rows (shape {shape})")
            if ids.dtype.kind == "i" and ids.min() < 0:
                raise ValueError(f"clusters[{i}] has negative cluster ids (min {ids.min()})")
            _, labels = np.unique(ids, return_inverse=True)
            labels = labels.reshape(-1).astype(np.int64)
            self.labels.append(labels)
            self.sizes.append(np.bincount(labels).astype(np.int64))
        self._torch_index: dict = {}
        self._triton_index: dict = {}
        self._cpu_index: dict = {}
        self._cpu_chunks: dict = {}
        # per-call caches: the same params and coefficients come back at every training step
        self._coefficients: tuple | None = None  # (raw arguments, η list, ε list)
        self._param_tables: dict = {}  # device -> (addresses + coefficients, device table)
        self._dtype_tasks: dict = {}  # (device, dtypes) -> per-dtype task tables

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        clusters = sum(len(s) for s in self.sizes)
        rows = sum(s[0] for s in self.shapes)
        return f"CSGDPlan({len(self)} params, {rows} rows in {clusters} clusters)"

    # -- torch path ---------------------------------------------------------------------------

    def torch_index(self, i: int, device: torch.device, dtype: torch.dtype):
        """(labels (n,) int64, 1/size (k,) of ``dtype``) of param ``i`` on ``device``, cached."""
        key = (i, device, dtype)
        if key not in self._torch_index:
            labels = torch.from_numpy(self.labels[i]).to(device)
            inv_size = torch.from_numpy(1.0 / self.sizes[i]).to(device=device, dtype=dtype)
            self._torch_index[key] = (labels, inv_size)
        return self._torch_index[key]

    # -- fused CPU path -------------------------------------------------------------------------

    def cpu_index(self, i: int, dtype: torch.dtype):
        """(rows grouped by cluster (n,) int64, bounds (k + 1,) int64, 1/size (k,) of ``dtype``)
        of param ``i`` for the fused CPU pass, cached."""
        key = (i, dtype)
        if key not in self._cpu_index:
            labels, sizes = self.labels[i], self.sizes[i]
            rows = np.argsort(labels, kind="stable").astype(np.int64)
            bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            self._cpu_index[key] = (rows, bounds, (1.0 / sizes).astype(np_dtype))
        return self._cpu_index[key]

    def cpu_chunks(self, indices: tuple[int, ...], n_threads: int):
        """The fused CPU pass's work split for the params ``indices`` (positions in that list)."""
        key = (indices, n_threads)
        if key not in self._cpu_chunks:
            row_lengths = [int(np.prod(self.shapes[i])) // self.shapes[i][0] for i in indices]
            self._cpu_chunks[key] = _cpu.split_work([self.sizes[i] for i in indices],
                                                    row_lengths, n_threads)
        return self._cpu_chunks[key]

    def all_singletons(self, i: int) -> bool:
        return len(self.sizes[i]) == self.shapes[i][0]

    # -- triton path --------------------------------------------------------------------------

    def triton_tables(self, device: torch.device, block: int):
        """Index tables for the fused kernel, on ``device`` (built once per device).

        Returns ``(members, clusters, tasks, task_param)``: ``members`` the row indices of every
        param grouped by cluster (clusters in ascending size order, so tasks that pack several
        clusters loop over similar sizes); ``clusters`` (C, 2) (start in members, size);
        ``tasks`` (T, 6) (param, first cluster, n clusters, span, first column, largest size);
        ``task_param`` the host copy of the tasks' param column, for per-dtype launches.
        """
        key = (device, block)
        if key not in self._triton_index:
            members, clusters, tasks = [], [], []
            member_base = cluster_base = 0
            per_param = zip(self.shapes, self.labels, self.sizes, strict=True)
            for p, (shape, labels, sizes) in enumerate(per_param):
                n, k = shape[0], len(sizes)
                row_len = int(np.prod(shape)) // n
                by_size = np.argsort(sizes, kind="stable")
                rank = np.empty(k, dtype=np.int64)
                rank[by_size] = np.arange(k)
                members.append(np.argsort(rank[labels], kind="stable"))
                sorted_sizes = sizes[by_size]
                starts = member_base + np.concatenate([[0], np.cumsum(sorted_sizes)[:-1]])
                clusters.append(np.stack([starts, sorted_sizes], axis=1))
                tasks.append(_csgd_tasks(p, cluster_base, sorted_sizes, row_len, block))
                member_base += n
                cluster_base += k
            tasks = np.concatenate(tasks)
            self._triton_index[key] = (
                upload_int64(np.concatenate(members), device),
                upload_int64(np.concatenate(clusters), device),
                upload_int64(tasks, device),
                tasks[:, 0].copy(),
            )
        return self._triton_index[key]


def _cluster_ids(c, name: str) -> np.ndarray:
    """A 1-D integer array of cluster ids (int64, or uint64 when ids exceed int64)."""
    if hasattr(c, "detach") and hasattr(c, "cpu"):
        c = c.detach().cpu().numpy()
    raw = np.asarray(c)
    if raw.dtype == np.uint64 and raw.ndim == 1:
        return raw  # np.unique renumbers them; ids >= 2**63 are fine
    return as_int_array(raw, name, ndim=1)


class _PlanCache:
    """Plans for label arrays passed to :func:`csgd_transform_` directly, keyed by content.

    A training loop that passes the same clusters at every step then builds one plan, not one
    per call. The key holds the shapes and every label array's bytes (arrays shared by several
    params are read once), so a changed label array is a different key: no identity or
    staleness rule is needed. CUDA label tensors are keyed by identity and version counter
    instead (reading them would synchronise with the GPU); the cache holds a reference to
    them, so their memory cannot be reused by another tensor while the entry lives. A few
    entries are kept, least recently used first out.
    """

    SIZE = 8

    def __init__(self):
        self._entries: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(params, clusters):
        if not isinstance(params, (list, tuple)) or not isinstance(clusters, (list, tuple)):
            return None
        if len(params) != len(clusters):
            return None
        shapes = tuple(tuple(p.shape) if isinstance(p, torch.Tensor) else None for p in params)
        parts, seen = [], {}
        for c in clusters:
            part = seen.get(id(c))
            if part is None:
                part = _PlanCache._fingerprint(c)
                if part is None:
                    return None
                seen[id(c)] = part
            parts.append(part)
        return shapes, tuple(parts)

    @staticmethod
    def _fingerprint(c):
        if isinstance(c, torch.Tensor):
            if c.device.type != "cpu":
                return ("tensor", c, c._version)  # holds c: its address is not reused
            c = c.detach().numpy()
        if isinstance(c, np.ndarray):
            return (c.dtype.str, c.shape, np.ascontiguousarray(c).tobytes())
        return None  # lists etc.: not cached, a plan is built for the call

    def get(self, params, clusters) -> CSGDPlan:
        key = self.key(params, clusters)
        if key is None:
            return CSGDPlan(params, clusters)
        with self._lock:
            plan = self._entries.pop(key, None)
            if plan is not None:
                self._entries[key] = plan  # most recently used last
                return plan
        plan = CSGDPlan(params, clusters)  # validates; raises before anything is cached
        with self._lock:
            self._entries[key] = plan
            while len(self._entries) > self.SIZE:
                self._entries.pop(next(iter(self._entries)))
        return plan

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_plans = _PlanCache()


def _csgd_tasks(p: int, cluster_base: int, sorted_sizes: np.ndarray, row_len: int,
                block: int) -> np.ndarray:
    """The (T, 6) task rows of one param (see :func:`~._triton_kernels.csgd_kernel`)."""
    k = len(sorted_sizes)
    if row_len > block:  # one cluster per task, several column chunks per cluster
        chunks = -(-row_len // block)
        cluster = np.repeat(np.arange(k), chunks)
        col0 = np.tile(np.arange(chunks) * block, k)
        return np.stack([np.full_like(cluster, p), cluster_base + cluster, np.ones_like(cluster),
                         np.full_like(cluster, block), col0, sorted_sizes[cluster]], axis=1)
    per_task = block // row_len  # several whole clusters per task
    first = np.arange(0, k, per_task)
    count = np.minimum(per_task, k - first)
    largest = sorted_sizes[first + count - 1]  # sizes ascend within the param
    return np.stack([np.full_like(first, p), cluster_base + first, count,
                     np.full_like(first, row_len), np.zeros_like(first), largest], axis=1)


# ---------------------------------------------------------------------------------------------
# input checks


def _check_call(params, clusters, weight_decay, centripetal, *, cached: bool = False):
    if isinstance(clusters, CSGDPlan):
        plan = clusters
    else:
        plan = _plans.get(params, clusters) if cached else CSGDPlan(params, clusters)
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list or tuple, got {type(params).__name__}")
    if len(params) != len(plan):
        raise ValueError(f"the plan has {len(plan)} params but {len(params)} were passed")
    grads, seen = [], set()
    for i, p in enumerate(params):
        check_float_tensor(p, f"params[{i}]")
        if tuple(p.shape) != plan.shapes[i]:
            raise ValueError(f"params[{i}] has shape {tuple(p.shape)} but the plan was built for "
                             f"{plan.shapes[i]}")
        g = p.grad
        if g is None:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) has no .grad; call backward() "
                             "first, or leave params without gradients out")
        check_float_tensor(g, f"params[{i}].grad")
        if g.shape != p.shape:
            raise ValueError(f"params[{i}].grad has shape {tuple(g.shape)}, param has "
                             f"{tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"params[{i}].grad has dtype {g.dtype}, param has {p.dtype}")
        if g.data_ptr() in seen:
            raise ValueError(f"params[{i}] appears twice (or shares its .grad with another param)")
        seen.add(g.data_ptr())
        grads.append(g)
    device = common_device(list(params) + grads, "params and their grads")
    etas = per_param_coefficient(weight_decay, "weight_decay", len(params))
    epss = per_param_coefficient(centripetal, "centripetal", len(params))
    return plan, device, etas, epss


def _quick_check(params, plan: CSGDPlan):
    """The params' device when they are exactly what ``plan`` expects, else None.

    The transform runs at every training step, and :func:`_check_call` costs a few µs per
    param (~0.5 ms for ResNet-50, several times the fused kernel on a GPU). This lean pass
    covers the same conditions; on any doubt the caller runs the full check, which names the
    problem.
    """
    if not isinstance(params, (list, tuple)) or len(params) != len(plan):
        return None
    device = None
    for p, shape in zip(params, plan.shapes, strict=True):
        g = getattr(p, "grad", None)
        if (g is None or p.dtype not in FLOAT_DTYPES or g.dtype != p.dtype
                or g.layout != torch.strided or p.shape != shape or g.shape != shape):
            return None
        if device is None:
            device = p.device
        if p.device != device or g.device != device:
            return None
    grad_addresses = [p.grad.data_ptr() for p in params]
    if len(set(grad_addresses)) != len(grad_addresses):
        return None
    return device


def _coefficients(plan: CSGDPlan, weight_decay, centripetal):
    """Validated per-param η and ε lists, cached on the plan for repeated arguments."""
    try:
        key = tuple(x if isinstance(x, numbers.Number) else tuple(x)
                    for x in (weight_decay, centripetal))
    except TypeError:
        key = None
    if key is None or plan._coefficients is None or plan._coefficients[0] != key:
        etas = per_param_coefficient(weight_decay, "weight_decay", len(plan))
        epss = per_param_coefficient(centripetal, "centripetal", len(plan))
        plan._coefficients = (key, etas, epss)
    return plan._coefficients[1:]


def _prepare_call(params, clusters, weight_decay, centripetal):
    """(plan, device, η list, ε list) for a call of :func:`csgd_transform_`; raises on bad input."""
    plan = clusters if isinstance(clusters, CSGDPlan) else None
    if plan is None:
        try:
            plan = _plans.get(params, clusters)
        except (TypeError, ValueError):
            plan = None  # the full check below names the problem
    if plan is not None:
        device = _quick_check(params, plan)
        if device is not None:
            return (plan, device, *_coefficients(plan, weight_decay, centripetal))
    return _check_call(params, clusters, weight_decay, centripetal)


# ---------------------------------------------------------------------------------------------
# references


def csgd_transform_ref(params, clusters, *, weight_decay, centripetal) -> None:
    """Readable segment form, one cluster at a time: the oracle for :func:`csgd_transform_`.

    ``G'_a = mean_H(G) + η·W_a + ε·(W_a − mean_H(W))`` for every row a of every cluster H,
    computed in float32 (float64 for float64 params) and written into each ``param.grad``.
    """
    plan, _, etas, epss = _check_call(params, clusters, weight_decay, centripetal)
    with torch.no_grad():
        for p, labels, eta, eps in zip(params, plan.labels, etas, epss, strict=True):
            n = p.shape[0]
            W = p.detach().reshape(n, -1).to(acc_dtype(p.dtype))
            G = p.grad.reshape(n, -1).to(W.dtype)
            new = torch.empty_like(G)
            labels = torch.from_numpy(labels).to(p.device)
            for h in torch.unique(labels):
                rows = torch.nonzero(labels == h).squeeze(1)
                W_h, G_h = W[rows], G[rows]
                new[rows] = G_h.mean(0) + eta * W_h + eps * (W_h - W_h.mean(0))
            p.grad.copy_(new.view_as(p.grad))


def dense_operators(labels: torch.Tensor, eta: float, eps: float, dtype=torch.float32):
    """The dense (n, n) matrices ``M`` and ``D = (η + ε)·I − ε·M`` of one param's clustering."""
    same = (labels[:, None] == labels[None, :]).to(dtype)
    M = same / same.sum(dim=1, keepdim=True)
    D = (eta + eps) * torch.eye(len(labels), dtype=dtype, device=labels.device) - eps * M
    return M, D


def csgd_transform_dense_ref(params, clusters, *, weight_decay, centripetal) -> None:
    """The paper's dense form ``G' = M·G + D·W`` (O(n²·F) per param): reference and baseline."""
    plan, _, etas, epss = _check_call(params, clusters, weight_decay, centripetal)
    with torch.no_grad():
        for p, labels, eta, eps in zip(params, plan.labels, etas, epss, strict=True):
            n = p.shape[0]
            dtype = acc_dtype(p.dtype)
            M, D = dense_operators(torch.from_numpy(labels).to(p.device), eta, eps, dtype)
            W = p.detach().reshape(n, -1).to(dtype)
            G = p.grad.reshape(n, -1).to(dtype)
            p.grad.copy_((M @ G + D @ W).view_as(p.grad))


# ---------------------------------------------------------------------------------------------
# torch segment form (the CPU path)


def _csgd_transform_torch(params, plan: CSGDPlan, etas, epss, indices=None) -> None:
    """Per param: two segment sums into (k, F) cluster tables, then one gather into G.

    No (n, F) temporary for float32/float64 params: the cluster sums are taken before G is
    overwritten, and G is then rebuilt in place (index_select into it, plus (η + ε)·W).
    ``indices``: the params to transform (default: all).
    """
    for i in range(len(params)) if indices is None else indices:
        p, eta, eps = params[i], etas[i], epss[i]
        W, G = p.detach(), p.grad
        if plan.all_singletons(i):  # every row its own cluster: G' = G + η·W
            G.add_(W, alpha=eta)
            continue
        dtype = acc_dtype(p.dtype)
        labels, inv_size = plan.torch_index(i, p.device, dtype)
        W_acc, G_acc = W.to(dtype), G.to(dtype)  # no copies for float32 / float64
        table_shape = (len(inv_size), *p.shape[1:])
        centre = G_acc.new_zeros(table_shape).index_add_(0, labels, G_acc)
        w_sums = W_acc.new_zeros(table_shape).index_add_(0, labels, W_acc)
        centre.add_(w_sums, alpha=-eps)
        centre.mul_(inv_size.view(-1, *[1] * (p.dim() - 1)))  # mean_H(G − ε·W)
        if G.dtype == dtype:
            torch.index_select(centre, 0, labels, out=G)
            G.add_(W, alpha=eta + eps)
        else:  # float16 / bfloat16: finish in float32, round once
            G.copy_(centre.index_select(0, labels).add_(W_acc, alpha=eta + eps))


# ---------------------------------------------------------------------------------------------
# fused CPU path (Numba)


def _csgd_transform_cpu(params, plan: CSGDPlan, etas, epss) -> None:
    """The fused CPU pass (:mod:`._cpu_kernels`) on every float32/float64 param whose weight and
    gradient rows are dense blocks of one layout; the torch segment form on the others."""
    fused, views, rest = [], [], []
    for i, p in enumerate(params):
        W, G = p.detach(), p.grad.detach()  # numpy views need tensors outside autograd
        if p.dtype in _cpu.SUPPORTED and same_layout(W, G) and _cpu.ready(p.dtype):
            W2, G2 = _cpu.rows_view(W), _cpu.rows_view(G)
            if W2 is not None and G2 is not None:
                fused.append(i)
                views.append((W2.numpy(), G2.numpy()))
                continue
        rest.append(i)
    if fused:
        index = [plan.cpu_index(i, params[i].dtype) for i in fused]
        _cpu.run([w for w, _ in views], [g for _, g in views], [x[0] for x in index],
                 [x[1] for x in index], [x[2] for x in index], [etas[i] for i in fused],
                 [epss[i] for i in fused], plan.cpu_chunks(tuple(fused), thread_count(None)))
    if rest:
        _csgd_transform_torch(params, plan, etas, epss, rest)


# ---------------------------------------------------------------------------------------------
# fused Triton path


def _csgd_transform_triton(params, plan: CSGDPlan, etas, epss, device) -> None:
    from accelprune.kernels import _triton_kernels as tk

    tk.check_launchable(device)
    kernel = tk.csgd_kernel
    members, clusters, tasks, task_param = plan.triton_tables(device, tk.CS_BLOCK)

    # Rows must be dense blocks with one layout in W and G; otherwise work on copies.
    weights, grads, copied_back = [], [], []
    for p in params:
        W, G = rows_dense(p.detach()), p.grad
        if not (same_layout(W, G) and rows_dense(G) is G):
            W, G = W.contiguous(), G.contiguous()
            if G is not p.grad:
                copied_back.append((p.grad, G))
        weights.append(W)
        grads.append(G)

    # The param table (addresses, η, ε) is uploaded only when it changes: in steady-state
    # training the caching allocator hands back the same gradient buffers at every step.
    addresses = [t.data_ptr() for pair in zip(weights, grads, strict=True) for t in pair]
    key = (addresses, etas, epss)
    cached = plan._param_tables.get(device)
    if cached is not None and cached[0] == key:
        param_table = cached[1]
    else:
        table = np.zeros((len(params), 5), dtype=np.int64)
        table[:, :2] = np.array(addresses, dtype=np.int64).reshape(-1, 2)
        table[:, 2] = [W.numel() // W.shape[0] for W in weights]
        table[:, 3:] = np.array([etas, epss], dtype=np.float64).T.view(np.int64)
        param_table = upload_int64(table, device)
        plan._param_tables[device] = (key, param_table)

    dtypes = tuple(W.dtype for W in weights)
    with device_context(device):
        for dtype, launch_tasks in _tasks_by_dtype(plan, device, dtypes, tasks, task_param):
            first = dtypes.index(dtype)
            kernel[(len(launch_tasks),)](param_table, launch_tasks, clusters, members,
                                         weights[first], ACC=tk.acc_type(dtype), BLOCK=tk.CS_BLOCK)
    for grad, work in copied_back:
        grad.copy_(work)


def _tasks_by_dtype(plan: CSGDPlan, device, dtypes: tuple, tasks, task_param):
    """[(dtype, task table)]: one launch per dtype (the kernel's pointer type is static)."""
    if len(set(dtypes)) == 1:
        return [(dtypes[0], tasks)]
    key = (device, dtypes)
    if key not in plan._dtype_tasks:
        groups = []
        for dtype in dict.fromkeys(dtypes):
            in_group = np.array([d == dtype for d in dtypes])[task_param]
            groups.append((dtype, tasks[upload_int64(np.flatnonzero(in_group), device)]))
        plan._dtype_tasks[key] = groups
    return plan._dtype_tasks[key]


# ---------------------------------------------------------------------------------------------
# public dispatcher


def csgd_transform_(params, clusters, *, weight_decay, centripetal, backend: str = "auto") -> None:
    """Apply the C-SGD gradient transform in place on every ``param.grad``.

    Call it after ``loss.backward()`` and before ``optimizer.step()`` (with the optimizer's own
    weight decay off for these params: η is applied here).

    Args:
        params: list of tensors with ``.grad`` set: conv / linear weights, biases, BN γ and β,
            mixed freely, of any real float dtype (float16, bfloat16, float32, float64); rows
            (dim 0) are output channels. All on one device.
        clusters: a :class:`CSGDPlan` for these params, or one 1-D integer array of cluster ids
            per param (any non-negative ids, numpy / tensor / list). Plans for label arrays are
            cached by content (tensors on a GPU: by identity and version), so passing the same
            arrays at every step builds one plan; building the plan yourself skips even the
            lookup.
        weight_decay: η, one float or one per param (e.g. 0 for BN γ/β).
        centripetal: ε, one float or one per param (e.g. 0.1·ε for biases and BN).
        backend: ``"auto"`` (Triton on CUDA tensors; on the CPU the fused Numba pass, or the
            reference where Numba is missing and for float16/bfloat16), ``"triton"`` (CUDA, or
            CPU under ``TRITON_INTERPRET=1``), ``"reference"`` (the torch segment form with
            ``index_add_``, any device).
    """
    plan, device, etas, epss = _prepare_call(params, clusters, weight_decay, centripetal)
    path = select_backend(backend, device)
    with torch.no_grad():
        if path == "triton":
            _csgd_transform_triton(params, plan, etas, epss, device)
        elif backend == "auto" and device.type == "cpu" and _cpu.available():  # numba
            _csgd_transform_cpu(params, plan, etas, epss)
        else:
            _csgd_transform_torch(params, plan, etas, epss)
