"""N:M semi-structured sparsity (2:4 by default): the "hardware-friendly sparsity" of seed 001.

Every group of ``m`` consecutive weights along a layer's input dimension keeps at most ``n``
non-zeros. That is the layout NVIDIA's sparse tensor cores accelerate for 2:4 (Ampere and
later): ``torch.sparse.to_sparse_semi_structured`` compresses a 2:4 Linear weight to half its
values plus metadata, and ``F.linear`` then runs a sparse GEMM.

* :func:`nm_prune` masks the weights through ``torch.nn.utils.prune`` (as
  :func:`accelprune.magnitude_prune` does: ``weight_orig`` and ``weight_mask``), so the model
  can be fine-tuned with the pattern kept; :func:`accelprune.make_permanent` bakes it in.
  Linear weights (out, in): groups along ``in``. Conv weights (out, in/groups, *kernel): groups
  along the input channels at each kernel position (the GEMM's reduction dimension when the
  conv is lowered to a GEMM with channels innermost, as cuDNN's implicit GEMM does).
* :func:`to_semi_structured` converts eligible Linear weights to torch's compressed
  semi-structured format, on CUDA only (it says why it does nothing elsewhere).

The selection for all layers is one call of :func:`accelprune.kernels.nm.nm_keep_mask` on the
stacked groups (one Triton launch on CUDA).
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch.nn.utils import prune

from accelprune._validation import check_int
from accelprune.kernels.nm import nm_keep_mask
from accelprune.masks import (
    dense_parameter,
    is_reparametrised,
    masks_all_or_nothing,
    resolve_parameters,
)

__all__ = ["NM_IMPORTANCES", "NMReport", "is_nm_sparse", "nm_prune", "to_semi_structured"]

NM_IMPORTANCES = ("l1", "taylor")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclasses.dataclass
class NMReport:
    """What :func:`nm_prune` did.

    pruned: ``{"layer.weight": fraction of zeros in its mask}`` of the masked tensors.
    skipped: ``{"layer.weight": why}`` of the selected tensors left alone.
    n, m: the pattern.
    """

    pruned: dict[str, float]
    skipped: dict[str, str]
    n: int
    m: int


def _grouped(module: nn.Module, w: torch.Tensor, m: int) -> torch.Tensor:
    """``w`` as (groups, m): ``m`` consecutive input channels at one output and kernel position.
    A copy for convs (channels moved last), a view for Linear."""
    if isinstance(module, _CONVS):
        return w.movedim(1, -1).reshape(-1, m)
    return w.reshape(-1, m)


def _ungrouped(module: nn.Module, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_grouped`: a (groups, m) table back to the weight's shape."""
    if isinstance(module, _CONVS):
        moved = (shape[0], *shape[2:], shape[1])
        return keep.reshape(moved).movedim(-1, 1).contiguous()
    return keep.reshape(shape)


def _input_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, _CONVS):
        return module.in_channels // module.groups
    return None


def _why_not(module: nn.Module, name: str, m: int) -> str | None:
    if name != "weight":
        return f"only weights have an input dimension to group, not {name!r}"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convs are not supported (their input is dim 0)"
    width = _input_width(module)
    if width is None:
        return f"{type(module).__name__} is not a Linear or Conv layer"
    if width % m:
        return f"input width {width} is not a multiple of m = {m}"
    return None


def _scores(module: nn.Module, importance: str) -> torch.Tensor:
    w = dense_parameter(module, "weight").detach()
    mask = getattr(module, "weight_mask", None) if is_reparametrised(module, "weight") else None
    if importance == "taylor":
        grad = dense_parameter(module, "weight").grad
        if grad is None:
            raise ValueError(f"{type(module).__name__}.weight has no gradient: run "
                             "loss.backward() before importance='taylor'")
        s = (w * grad.detach()).abs()
    else:
        s = w.abs()
    if mask is not None:
        s = s * mask  # already-masked weights score 0: they are not worth keeping
    return s.float()


def nm_prune(model: nn.Module, n: int = 2, m: int = 4, *, importance: str = "l1",
             parameters=None, backend: str = "auto") -> NMReport:
    """Mask ``model``'s weights so that every ``m`` consecutive inputs keep at most ``n``.

    Args:
        model: masked in place through ``torch.nn.utils.prune`` (``weight_orig``,
            ``weight_mask``); existing masks are kept and combined (masked weights score 0).
        n, m: keep ``n`` of every ``m`` (1 <= n < m); 2:4 is what sparse tensor cores run.
        importance: ``"l1"`` keeps the largest |w|; ``"taylor"`` the largest |w · ∂L/∂w|
            (run ``loss.backward()`` first). Ties go to the earlier input channel.
        parameters: which tensors (see :func:`accelprune.masks.resolve_parameters`); default
            every Conv / Linear weight.
        backend: for the selection (:func:`accelprune.kernels.nm.nm_keep_mask`).

    Returns:
        :class:`NMReport`: the masked tensors' sparsity and the skipped ones with the reason
        (input width not a multiple of ``m``, transposed conv, not a weight...).

    All or nothing: every input is checked and every mask computed before the first is applied,
    and a failure while applying them takes the earlier ones off again.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    m = check_int(m, "m", low=2)
    n = check_int(n, "n", low=1)
    if n >= m:
        raise ValueError(f"n must be below m (n = {n}, m = {m}): n = m keeps everything")
    if not isinstance(importance, str):
        raise TypeError(f"importance must be a string, got {type(importance).__name__}")
    if importance not in NM_IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; expected one of "
                         f"{list(NM_IMPORTANCES)}")
    pairs = resolve_parameters(model, parameters)
    names = {id(mod): name for name, mod in model.named_modules()}

    chosen, skipped, tables = [], {}, []
    for module, pname in pairs:
        full = f"{names[id(module)]}.{pname}" if names[id(module)] else pname
        why = _why_not(module, pname, m)
        if why is not None:
            skipped[full] = why
            continue
        chosen.append((module, full))
        tables.append(_grouped(module, _scores(module, importance), m))
    if not chosen:
        return NMReport({}, skipped, n, m)

    # one selection for the whole model: the groups of every layer stacked
    devices = {t.device for t in tables}
    if len(devices) > 1:
        raise ValueError(f"the weights are on several devices {sorted(map(str, devices))}")
    keep = nm_keep_mask(torch.cat(tables), n, backend=backend)
    masks = []
    for (module, _), part in zip(chosen, torch.split(keep, [len(t) for t in tables]),
                                 strict=True):
        w = dense_parameter(module, "weight")
        masks.append(_ungrouped(module, part, w.shape).to(w.dtype))

    pruned = {}
    with torch.no_grad(), masks_all_or_nothing({module for module, _ in chosen}):
        for (module, full), mask in zip(chosen, masks, strict=True):
            prune.custom_from_mask(module, "weight", mask)
            final = module.weight_mask
            pruned[full] = float((final == 0).sum()) / final.numel()
    return NMReport(pruned, skipped, n, m)


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4, *,
                 module: nn.Module | None = None) -> bool:
    """Whether every ``m`` consecutive entries along the input dimension of ``weight`` hold at
    most ``n`` non-zeros (a Linear weight, or a conv weight with ``module`` given)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    m = check_int(m, "m", low=1)
    n = check_int(n, "n", low=0)
    inner = weight.shape[1] if weight.dim() > 1 else weight.shape[0]
    if inner % m:
        return False
    groups = _grouped(module, weight.detach(), m) if module is not None else \
        weight.detach().reshape(-1, m)
    return bool(((groups != 0).sum(1) <= n).all())


def to_semi_structured(model: nn.Module) -> dict[str, str]:
    """Replace every eligible Linear weight by ``torch.sparse.to_sparse_semi_structured`` of it,
    in place, so that ``F.linear`` runs NVIDIA's 2:4 sparse GEMM; returns ``{layer name:
    "converted" or why not}``.

    Eligible: a Linear on a CUDA device of compute capability >= 8.0 (sparse tensor cores),
    float16 / bfloat16 (or int8) weights, already 2:4 (prune with :func:`nm_prune`, then
    :func:`accelprune.make_permanent`), shapes torch accepts (e.g. both dims multiples of 64;
    torch's error is passed on as the reason). The converted weights are frozen
    (``requires_grad=False``): the format is for inference.

    On the CPU it changes nothing and warns: torch's semi-structured kernels (cuSPARSELt /
    CUTLASS) exist only for CUDA, and there is no CPU kernel that runs 2:4 faster than dense.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = {}
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    cpu_reason = None
    for name, mod in linears:
        why = _conversion_blocker(mod)
        if why is not None:
            out[name] = why
            if why.startswith("on "):
                cpu_reason = why
            continue
        try:
            sparse = torch.sparse.to_sparse_semi_structured(mod.weight.detach())
        except Exception as e:  # shape, dtype or backend refused by torch: say so
            out[name] = f"torch refused: {type(e).__name__}: {e}"
            continue
        mod.weight = nn.Parameter(sparse, requires_grad=False)
        out[name] = "converted"
    if cpu_reason is not None and "converted" not in out.values():
        warnings.warn(f"to_semi_structured converted nothing: {cpu_reason}", UserWarning,
                      stacklevel=2)
    return out


def _conversion_blocker(mod: nn.Linear) -> str | None:
    if is_reparametrised(mod, "weight"):
        return ("masked by torch.nn.utils.prune: call accelprune.make_permanent(model) "
                "first")
    w = mod.weight
    if w.layout != torch.strided:
        return "already sparse"
    if w.device.type != "cuda":
        return (f"on {w.device.type}: torch's semi-structured (2:4) sparse kernels, cuSPARSELt "
                "and CUTLASS, run only on CUDA GPUs of compute capability >= 8.0; move the "
                "model to such a GPU first")
    major, _ = torch.cuda.get_device_capability(w.device)
    if major < 8:
        return (f"on a GPU of compute capability {major}.x: 2:4 sparse tensor cores need "
                ">= 8.0 (Ampere)")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.int8):
        return f"dtype {w.dtype}: convert the model to float16 or bfloat16 first"
    if not is_nm_sparse(w, 2, 4):
        return "weight is not 2:4 sparse: run nm_prune(model, 2, 4) and make_permanent first"
    return None
