"""The correctness oracle: proves a pruning result right, independently of surgery.

For a pruning result, the *masked original* is a copy of the original model with
every pruned coordinate (everything not in ``kept``) set to zero in every parameter.
Two things must hold:

* every pruned parameter equals the original indexed by the kept indices, with
  zeros where an index is -1 (a padding channel), and every other parameter the
  pruned model shares with the original is unchanged;
* when every pruned group is exact, the pruned model's outputs equal the masked
  original's (float32: max error under 1e-4 of each output's scale). When a pruned
  group is inexact (a norm, softmax or mean over its channels), outputs must still
  have the right number and shapes, but their values are no proof and only reported.

The oracle indexes with its own code (``index_select`` per dim, ``torch.where`` for
padding) and never imports the passes, so a bug in surgery cannot vouch for itself.
It never modifies the models it is given: it masks a copy, and runs a copy in eval
mode when a model is in train mode. On a mismatch it raises
:class:`~fxprune.errors.VerificationError` naming the node (and the user's source
line) where the pruned graph first diverges, when a :class:`GraphPlan` says which
channels each node keeps, or else the output that differs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from fxprune import meta
from fxprune.channels import Layout, PruneGroup
from fxprune.errors import VerificationError
from fxprune.graph_modes import ExportedModule, in_mode
from fxprune.trace import ExampleInputs, flat_inputs, trace

logger = logging.getLogger(__name__)

Kept = dict[str, dict[int, torch.Tensor]]
TOLERANCE = 1e-4
_HALF = (torch.float16, torch.bfloat16)


def tolerance(dtype: torch.dtype) -> float:
    """The largest output error the oracle accepts, as a fraction of the output's scale.

    1e-4 in float32 and float64 (DESIGN.md). In fp16 and bf16 a kernel that sums in another
    order (cuSPARSELt against cuBLAS, a smaller GEMM tile) rounds differently: 8 units in
    the last place of the format, still far below what one wrongly removed channel does."""
    return max(TOLERANCE, 8 * torch.finfo(dtype).eps) if dtype in _HALF else TOLERANCE


@contextlib.contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    """Both TF32 switches (cuBLAS matrix products, cuDNN convolutions) set for the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def exact_float32() -> contextlib.AbstractContextManager:
    """fp32 matrix products and convolutions in fp32, not TF32, while the oracle runs.

    On an Ampere or newer GPU, cuDNN convolutions use TF32 by default (and matmuls do when
    the user allows it): the masked original and the pruned model, whose kernels differ in
    shape, would then differ by about 1e-3 of the scale, ten times the oracle's tolerance."""
    return allow_tf32(False)


def outputs_tolerance(outputs: list[torch.Tensor]) -> float:
    """:func:`tolerance` of the least precise of ``outputs``."""
    return max((tolerance(t.dtype) for t in outputs), default=TOLERANCE)


class ChannelLines(Protocol):
    """What the oracle needs from a channel plan: the surviving positions of a node's dim."""

    def kept_positions(self, lay: Layout, dim: int, size: int) -> np.ndarray: ...


@dataclass
class GraphPlan:
    """How to locate a divergence: the channel plan and the pre-surgery layout of each node.

    Only used to name the first diverging node once a mismatch is found; the verdict
    itself never depends on it.
    """

    plan: ChannelLines
    layouts: dict[str, Any]


@dataclass
class VerificationReport:
    """What the oracle checked. ``exact``: outputs were required to equal the masked original."""

    exact: bool
    parameters_checked: int
    max_error: float
    scale: float
    outputs: int
    note: str = ""

    @property
    def summary(self) -> str:
        if self.exact:
            return "outputs equal the masked original"
        return f"parameters only: {self.note}"

    def __str__(self) -> str:
        return (
            f"{self.summary}; {self.parameters_checked} parameters checked, "
            f"{self.outputs} outputs, max error {self.max_error:.2e} (output scale {self.scale:.2e})"
        )


# -- the oracle's own indexing ------------------------------------------------------------------
def tensor_at(module: nn.Module, fqn: str) -> torch.Tensor | None:
    """The parameter, buffer or tensor attribute ``fqn`` of ``module``, or None."""
    prefix, _, name = fqn.rpartition(".")
    try:
        owner = module.get_submodule(prefix) if prefix else module
    except AttributeError:
        return None
    t = getattr(owner, name, None)
    return t if isinstance(t, torch.Tensor) else None


def index_kept(t: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` indexed by the kept indices of each dim, zeros where an index is -1."""
    out = t.detach()
    for d, idx in dims.items():
        idx = torch.as_tensor(idx, dtype=torch.long, device=out.device)
        if idx.numel() and int(idx.max()) >= out.shape[d]:
            raise VerificationError(
                f"kept index {int(idx.max())} is out of range for dim {d} of size {out.shape[d]}."
            )
        pad = idx < 0
        if not bool(pad.any()):  # the common case: no padding channel, one gather
            out = out.index_select(d, idx)
            continue
        out = out.index_select(d, torch.where(pad, torch.zeros_like(idx), idx))
        shape = [1] * out.dim()
        shape[d] = -1
        out = torch.where(pad.view(shape), torch.zeros((), dtype=out.dtype), out)
    return out


class _Dropped:
    """The dropped positions of kept-index tensors, each computed once: a conv's weight, its
    BatchNorm's four vectors and the next conv's input dim often share one index tensor."""

    def __init__(self) -> None:
        self._found: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, idx: torch.Tensor, size: int) -> torch.Tensor | None:
        """The positions of ``size`` that ``idx`` does not keep, or None when it keeps all."""
        key = (id(idx), size)
        hit = self._found.get(key)
        if hit is not None and hit[0] is idx:
            return hit[1]
        keep = _kept_flags(idx, size)
        dropped = None if keep.all() else torch.from_numpy(np.flatnonzero(~keep))
        self._found[key] = (idx, dropped)  # holding ``idx`` keeps its id from being reused
        return dropped


def _kept_flags(idx: torch.Tensor, size: int) -> np.ndarray:
    """True at the positions of ``size`` that ``idx`` keeps (-1, a padding channel, keeps none)."""
    keep = np.zeros(size, dtype=bool)
    index = np.asarray(torch.as_tensor(idx, dtype=torch.long).cpu())
    keep[index[index >= 0]] = True
    return keep


def _masked(t: torch.Tensor, dims: dict[int, torch.Tensor], dropped: _Dropped) -> torch.Tensor:
    """A new tensor: ``t`` with every coordinate outside the kept indices of ``dims`` zero
    (zero, not ``0 * t``: an inf or nan pruned away must not survive); ``t`` is never written."""
    out, copied = t.detach(), False
    for d, idx in dims.items():
        where = dropped(idx, t.shape[d])
        if where is not None:
            if not copied:
                out, copied = out.clone(), True
            out.index_fill_(d, where.to(out.device), 0)
    return out


def _replace(module: nn.Module, fqn: str, value: torch.Tensor) -> None:
    prefix, _, name = fqn.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value, requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def masked_original(original: nn.Module, kept: Kept, *, in_place: bool = False) -> nn.Module:
    """A copy of ``original`` in eval mode, every parameter coordinate not in ``kept`` set
    to zero.

    Buffers keep their values: a buffer may be a divisor (DINOv3's rotary ``periods``,
    where a zero makes the whole reference NaN), and a dropped channel is already zero
    through the parameters of its group (every prunable group has one: a group of buffers
    only is frozen), whose consumers' columns are zeroed too. A buffer that alone made a
    dropped channel non-zero could only make this reference differ from the pruned model,
    never hide an error.

    ``in_place=True`` masks ``original`` itself, for a private copy nobody else runs
    (prune's :func:`snapshot`): its masked tensors are replaced by new ones, never written,
    since they may be shared.
    """
    m = original if in_place else copy.deepcopy(original)
    _eval(m)
    tensors, dropped = _named_tensors(m), _Dropped()
    buffers = {n for n, _ in m.named_buffers(remove_duplicate=False)}
    with torch.no_grad():
        for fqn, dims in kept.items():
            if fqn in buffers:
                continue
            t = tensors.get(fqn)
            if t is None:
                t = tensor_at(m, fqn)
            if t is None:
                raise VerificationError(
                    f"the result keeps indices of {fqn}, which the original model does not have."
                )
            _replace(m, fqn, _masked(t, dims, dropped))
    return m


class _MaskedOnCall:
    """A private graph made its own masked original without a masked copy of every weight.

    A masked copy of every weight costs a third of the forward it is made for (ResNet-50,
    batch 1), most of it in first touches of new memory. Instead, each parameter of a module
    that the graph only ever *calls* (a ``call_module`` target with no called ancestor and no
    ``get_attr`` reaching into it) is replaced by a view of one scratch buffer per dtype, the
    size of the largest such module, and a forward pre-hook writes its masked values there
    just before that module runs. The other kept tensors are masked up front, as :func:`masked_original`
    does. On exit the graph's own parameters are back in place.

    The masked values are the weight times a 0/1 vector per pruned dim: an inf or nan where a
    channel was dropped makes nan there, not zero, which can only make this reference
    differ from the pruned model; :func:`check` confirms any difference on a fully masked
    copy. A module whose output shares the scratch buffer (a forward that returns its weight)
    would hand on values the next module overwrites: such a run is marked ``aliased`` and
    must not be trusted.

    A model that is not a graph (``fxprune.verify`` on the caller's module) has no graph to
    say which modules only read their own tensors: every module's own parameters are
    masked when it is called. One whose weight another module reads directly (a tied
    embedding, MultiheadAttention's ``out_proj``) then reads stale values, the outputs
    differ, and the fully masked copy decides.
    """

    def __init__(self, gm: nn.Module, kept: Kept) -> None:
        self.gm, self.aliased = gm, False
        # per owner module: (name, tensor, masks, offset in the scratch buffer of its dtype)
        self._owned: dict[str, list[tuple[str, torch.Tensor, list[torch.Tensor], int]]] = {}
        self._need: dict[tuple[torch.device, torch.dtype], int] = {}  # scratch sizes
        rest: Kept = {}
        callable_only = (
            _modules_only_called(gm)
            if isinstance(gm, fx.GraphModule)
            else dict(gm.named_modules(remove_duplicate=False))
        )
        for fqn, dims in kept.items():
            prefix, _, name = fqn.rpartition(".")
            owner = callable_only.get(prefix)
            t = None if owner is None else owner._parameters.get(name)
            if t is None or not t.is_contiguous() or not t.is_floating_point():
                rest[fqn] = dims
                continue
            masks = _keep_masks(t, dims)
            if masks is None:  # nothing of it is dropped: the tensor stays as it is
                continue
            tensors = self._owned.setdefault(prefix, [])
            key = (t.device, t.dtype)
            at = sum(u.numel() for _, u, _, _ in tensors if (u.device, u.dtype) == key)
            tensors.append((name, t, masks, at))
            self._need[key] = max(self._need.get(key, 0), at + t.numel())
        self._rest = rest
        self._handles: list[Any] = []
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __enter__(self) -> nn.Module:
        gm = self.gm
        _eval(gm)
        masked_original(gm, self._rest, in_place=True)
        self._scratch = {k: torch.empty(n, device=k[0], dtype=k[1]) for k, n in self._need.items()}
        for path, tensors in self._owned.items():
            owner, writes = gm.get_submodule(path), []
            for name, t, masks, at in tensors:
                view = self._scratch[(t.device, t.dtype)][at : at + t.numel()].view(t.shape)
                owner._parameters[name] = nn.Parameter(view, requires_grad=False)
                writes.append((view, t, masks))
            # first among its pre-hooks: one that derives a weight from these (the old
            # weight_norm) must read masked values
            write = self._writer(writes)
            self._handles.append(owner.register_forward_pre_hook(write, prepend=True))
            self._handles.append(owner.register_forward_hook(self._alias_check))
        return gm

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        for path, tensors in self._owned.items():
            owner = self.gm.get_submodule(path)
            for name, t, _, _ in tensors:
                owner._parameters[name] = t

    @staticmethod
    def _writer(writes: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]):
        def write(module: nn.Module, args: Any) -> None:
            with torch.no_grad():
                for view, t, masks in writes:
                    torch.mul(t, masks[0], out=view)
                    for mask in masks[1:]:
                        view.mul_(mask)

        return write

    def _alias_check(self, module: nn.Module, args: Any, out: Any) -> None:
        starts = {b.untyped_storage().data_ptr() for b in self._scratch.values()}
        leaves, _ = tree_flatten(out)
        for t in leaves:
            strided = isinstance(t, torch.Tensor) and t.layout == torch.strided
            if strided and t.untyped_storage().data_ptr() in starts:
                self.aliased = True


def _keep_masks(t: torch.Tensor, dims: dict[int, torch.Tensor]) -> list[torch.Tensor] | None:
    """Per dim of ``dims`` that drops something, a vector shaped to broadcast against
    ``t``: 1 at the kept positions, 0 elsewhere. None when nothing is dropped."""
    masks = []
    for d, idx in dims.items():
        keep = _kept_flags(idx, t.shape[d])
        if keep.all():
            continue
        shape = [1] * t.dim()
        shape[d] = -1
        vector = torch.from_numpy(keep.astype(np.float32)).view(shape)
        masks.append(vector.to(device=t.device, dtype=t.dtype))
    return masks or None


def _modules_only_called(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """The ``call_module`` targets of ``gm`` whose tensors nothing else reads: no called
    module contains them and no ``get_attr`` reaches into or above them."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    under_attrs = {p for a in attrs for p in _prefixes(a)}  # every module some attr is in

    out = {}
    for path in called:
        above = _prefixes(path)[:-1]
        if path in under_attrs or any(p in called or p in attrs for p in above):
            continue
        out[path] = gm.get_submodule(path)
    return out


def _prefixes(path: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``."""
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


_VERSIONS = "fxprune.tensor_versions"


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """The oracle's reference for a prune: a copy of ``gm``'s graph and modules that shares
    its tensors (no weight is copied) and records their version counters.

    Surgery gives the pruned graph new tensors and leaves these alone; any in-place write
    to one of them would bump its counter, and :func:`check_snapshot` then refuses to
    trust the reference.
    """
    copied = _share_tensors(gm)
    # Its own class, holding the forward gm has now: gm's surgery recompiles gm's class.
    copied.__class__ = type(
        type(gm).__name__, (type(gm).__mro__[1],), {"forward": gm.forward.__func__}
    )
    graph = copy.deepcopy(gm.graph)  # surgery rewrites gm.graph in place
    graph.owning_module = copied
    copied.__dict__["_graph"] = graph  # the same code as gm's: nothing to recompile
    copied.__dict__["meta"] = dict(gm.meta)
    copied.meta[_VERSIONS] = {name: t._version for name, t in _named_tensors(copied).items()}
    return copied


def _share_tensors(module: nn.Module) -> nn.Module:
    """New module objects all the way down, holding the same tensors (a deepcopy copies
    every weight, and costs more than the forward this reference is made for). Each has
    its own tables of parameters, buffers and hooks: a hook the oracle adds to the copy
    must not run on the graph it was copied from."""
    new = object.__new__(type(module))
    state = dict(module.__dict__)
    for key, value in state.items():  # its own hook tables (and parameter, buffer tables)
        if key.startswith("_") and isinstance(value, (dict, set)):
            state[key] = copy.copy(value)
    state["_modules"] = {
        k: None if m is None else _share_tensors(m) for k, m in module._modules.items()
    }
    new.__dict__.update(state)
    return new


def check_snapshot(original: fx.GraphModule) -> None:
    """Raise if a tensor of a :func:`snapshot` was written in place since it was taken."""
    versions = original.meta.get(_VERSIONS, {})
    for name, t in _named_tensors(original).items():
        if name in versions and t._version != versions[name]:
            raise VerificationError(
                f"the original's tensor {name} was modified in place while pruning, so the "
                "masked original is no reference; surgery must replace tensors, not write them."
            )


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(dict(module.named_buffers(remove_duplicate=False)))
    return out


def check_params(original: nn.Module, pruned: nn.Module, kept: Kept) -> int:
    """Pruned tensors equal the original indexed by ``kept``; the others are unchanged.

    Returns how many tensors were compared; raises naming the node that uses a wrong one.
    A tensor the pruned model still shares with the original (the same object) is unchanged
    by identity.
    """
    before, after = _named_tensors(original), _named_tensors(pruned)
    checked = 0
    for fqn in sorted(kept):
        want = before.get(fqn)
        want = tensor_at(original, fqn) if want is None else want
        got = after.get(fqn)
        got = tensor_at(pruned, fqn) if got is None else got
        if want is None:
            raise VerificationError(
                f"the result keeps indices of {fqn}, which the original model does not have."
            )
        if got is None:
            raise VerificationError(f"the pruned model lost {fqn}{_user_of(pruned, fqn)}.")
        want = index_kept(want, kept[fqn])
        _compare_tensor(fqn, want, got.detach(), pruned, "the original indexed by the kept indices")
        checked += 1
    for fqn, got in after.items():
        want = None if fqn in kept else before.get(fqn)
        want = tensor_at(original, fqn) if want is None and fqn not in kept else want
        if want is not None:
            if got is not want:
                _compare_tensor(
                    fqn, want.detach(), got.detach(), pruned, "the original (not pruned)"
                )
            checked += 1
    return checked


def _compare_tensor(fqn: str, want: torch.Tensor, got: torch.Tensor, pruned, what: str) -> None:
    if want.shape != got.shape:
        raise VerificationError(
            f"parameter {fqn} has shape {list(got.shape)}, but {what} has shape "
            f"{list(want.shape)}{_user_of(pruned, fqn)}."
        )
    want = want.to(got.device)
    if _equal(want, got):  # the common case
        return
    same = want == got
    if want.is_floating_point():
        same |= want.isnan() & got.isnan()
    if not bool(same.all()):
        where = tuple(int(i) for i in (~same).nonzero()[0])
        raise VerificationError(
            f"parameter {fqn} is not {what}: first differing element {list(where)} "
            f"({float(got[where]):.6g} vs {float(want[where]):.6g}){_user_of(pruned, fqn)}."
        )


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) hold equal values. On the CPU through NumPy, whose
    comparison is vectorized: three times faster than ``torch.equal`` on a model's weights,
    which the oracle compares on every prune."""
    if a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in _NUMPY_DTYPES:
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)


def _user_of(module: nn.Module, fqn: str) -> str:
    """', used by node ... at file:line' for the graph node that reads ``fqn``."""
    if not isinstance(module, fx.GraphModule):
        return ""
    best: fx.Node | None = None
    for node in module.graph.nodes:
        if node.op == "get_attr" and node.target == fqn:
            best = node
            break
        inside = node.op == "call_module" and fqn.startswith(f"{node.target}.")
        if inside and (best is None or len(str(node.target)) > len(str(best.target))):
            best = node  # the innermost module that owns it
    return f", used by {meta.describe(best)}" if best is not None else ""


# -- exactness ----------------------------------------------------------------------------------
def inexact_reason(groups: Iterable[PruneGroup], kept: Kept, original: nn.Module) -> str | None:
    """Why output equality is no proof (the pruned groups that are inexact), or None if it is.

    A group counts as pruned when some position of a member of it is missing from
    ``kept``: read from the kept indices, not from the pruning report. A group found on
    a graph pruned before (a later ``Pruner`` step) cannot be matched to the original's
    positions and counts as pruned.
    """
    inexact = [g for g in groups if not g.exact and _is_pruned(g, kept, original)]
    if not inexact:
        return None
    return f"{len(inexact)} pruned group(s) are inexact ({inexact[0].inexact_reason})"


def _is_pruned(group: PruneGroup, kept: Kept, original: nn.Module) -> bool:
    for m in group.members:
        t = tensor_at(original, m.param)
        if t is not None and (m.dim >= t.dim() or len(m.index_map) != t.shape[m.dim]):
            return True
        idx = kept.get(m.param, {}).get(m.dim)
        if idx is None:
            continue
        positions = torch.nonzero(torch.as_tensor(m.index_map) >= 0).flatten()
        if not bool(torch.isin(positions, torch.as_tensor(idx)).all()):
            return True
    return False


# -- outputs ------------------------------------------------------------------------------------
def float_outputs(module: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """The floating-point tensors ``module`` returns on ``inputs`` (no grad), flattened."""
    ex = ExampleInputs.of(inputs)
    with torch.no_grad(), exact_float32():
        out = module(*ex.args, **ex.kwargs)
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def max_error(reference: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs error, the reference output's scale) over all float outputs."""
    err, scale = 0.0, 0.0
    for a, b in zip(reference, got):
        if a.shape != b.shape:
            return float("inf"), 1.0
        err = max(err, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
        scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
    return err, scale


Locate = Callable[[nn.Module, nn.Module], "str | None"]


def check(
    original: nn.Module,
    pruned: nn.Module,
    kept: Kept,
    example_inputs: Any,
    *,
    inexact: str | None = None,
    locate: Locate | None = None,
    original_is_private: bool = False,
) -> VerificationReport:
    """Run the oracle on ``pruned`` against ``original``; ``inexact``: why outputs prove nothing.

    ``locate(masked, pruned)`` names the first diverging node once outputs disagree.
    ``original_is_private``: ``original`` is a copy made for this check, so it is masked in
    place rather than copied again (``prune(verify=True)``; never for a caller's model).
    """
    checked = check_params(original, pruned, kept)
    with _in_eval(pruned) as run:
        got = float_outputs(run, example_inputs)
        reference = _lazy_reference(original, original_is_private)
        if reference is not None:
            masking = _MaskedOnCall(reference, kept)
            with masking as masked:
                ref = float_outputs(masked, example_inputs)
            if not masking.aliased:
                try:
                    return _comparefloat_outputs(ref, got, checked, inexact, lambda: None)
                except VerificationError as exc:
                    logger.debug("confirming on a fully masked copy: %s", exc)
        # the full reference: the verdict when the lazy one disagrees, and the node it names
        masked = masked_original(original, kept, in_place=original_is_private)
        ref = float_outputs(masked, example_inputs)
        return _comparefloat_outputs(
            ref, got, checked, inexact, lambda: _locate(locate, masked, run)
        )


def _lazy_reference(original: nn.Module, private: bool) -> nn.Module | None:
    """What :class:`_MaskedOnCall` may mask in place: ``original`` itself when it is a
    private graph; for a caller's model in eval mode, new module objects sharing its tensors
    (no weight copied: a model as large as ViT-H is verified in little more memory than it
    takes); None for a caller's model in train mode, whose reference is a full copy (a
    module it reaches outside its submodules would run in train mode and update its state).
    """
    if private:
        return original if isinstance(original, fx.GraphModule) else None
    if any(m.training for m in original.modules()):
        return None
    return _share_tensors(original)


def _comparefloat_outputs(
    ref: list[torch.Tensor],
    got: list[torch.Tensor],
    checked: int,
    inexact: str | None,
    where: Callable[[], str | None],
) -> VerificationReport:
    """The verdict on the outputs; ``where()`` names the first diverging node on failure."""

    def fail(message: str) -> VerificationError:
        node = where()
        if node:
            return VerificationError(f"{message} First diverging node: {node}.")
        return VerificationError(
            f"{message} (No node could be named: the result carries no graph plan, "
            "or no intermediate node differs.)"
        )

    if len(ref) != len(got):
        raise fail(f"the pruned model returns {len(got)} float tensors, the original {len(ref)}.")
    err, scale, worst = 0.0, 0.0, -1.0
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape:
            raise fail(
                f"output {i} of the pruned model has shape {list(b.shape)}, the masked "
                f"original's {list(a.shape)}."
            )
        e = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        s = float(a.abs().max()) if a.numel() else 0.0
        if e / max(s, 1.0) > worst:
            worst, err, scale = e / max(s, 1.0), e, s
        tol = tolerance(a.dtype)
        if inexact is None and not e <= tol * max(s, 1.0):
            raise fail(
                f"output {i} (shape {list(a.shape)}) of the pruned model differs from the masked "
                f"original by {e:.3e} (output scale {s:.3e}, tolerance {tol:g} of the scale)."
            )
    note = ""
    if inexact is not None:
        note = f"{inexact}; output comparison is not a proof"
    return VerificationReport(inexact is None, checked, err, scale, len(ref), note)


def _locate(locate: Locate | None, masked: nn.Module, run: nn.Module) -> str | None:
    if locate is None:
        return None
    try:
        return locate(masked, run)
    except Exception as exc:  # a diagnostic must never hide the verdict it explains
        logger.debug("could not locate the diverging node: %s", exc)
        return None


def _eval(module: nn.Module) -> None:
    with contextlib.suppress(NotImplementedError):  # torch.export graph modules fix their mode
        module.train(False)


@contextlib.contextmanager
def eval_flags(module: nn.Module) -> Iterator[None]:
    """Every submodule's training flag off inside, each restored after. Per module, since
    torch.export graph modules refuse ``.eval()`` on themselves; their graph keeps its mode."""
    flags = {m: m.training for m in module.modules()}
    for m in flags:
        m.training = False
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training


@contextlib.contextmanager
def _in_eval(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside, its modules' own flags as they were after.

    A graph from torch.export switches its graph with the mode, which flags alone would not
    restore: that one is run as an eval-mode copy instead.
    """
    if not any(m.training for m in module.modules()):
        yield module
    elif isinstance(module, ExportedModule) or hasattr(module, "_in_spec"):
        m = copy.deepcopy(module)
        _eval(m)
        yield m
    else:
        with in_mode(module, False):
            yield module


# -- locating the first diverging node ----------------------------------------------------------
class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
            self.values[n.name] = [t.detach() for t in out]
        return out


def first_divergence(
    masked_gm: fx.GraphModule,
    pruned_gm: fx.GraphModule,
    inputs: Any,
    plan: ChannelLines,
    layouts: dict[str, Any],
) -> str | None:
    """Name and source line of the first node whose pruned output differs from the masked one.

    Nodes are matched by name, op and target; the masked value is indexed by the
    positions the plan keeps on each channel dim before it is compared.
    """
    rec_a, rec_b = _Recorder(masked_gm), _Recorder(pruned_gm)
    with torch.no_grad(), exact_float32():
        rec_a.run(*flat_inputs(masked_gm, inputs))
        rec_b.run(*flat_inputs(pruned_gm, inputs))
    masked_nodes = {n.name: n for n in masked_gm.graph.nodes}
    for node in pruned_gm.graph.nodes:
        twin = masked_nodes.get(node.name)
        if twin is None or (twin.op, twin.target) != (node.op, node.target):
            continue
        a, b, lay = rec_a.values.get(node.name), rec_b.values.get(node.name), layouts.get(node.name)
        if isinstance(a, list) and isinstance(b, list) and isinstance(lay, list):
            if len(a) != len(b):
                return f"{meta.describe(node)}: {len(b)} outputs but expected {len(a)}"
            pairs = list(zip(a, b, lay))
        else:
            pairs = [(a, b, lay)]
        for i, (x, y, sub) in enumerate(pairs):
            what = _diverges(x, y, sub, plan)
            if what:
                part = f" (output {i})" if len(pairs) > 1 else ""
                return f"{meta.describe(node)}{part}: {what}"
    return None


def _diverges(a: Any, b: Any, lay: Any, plan: ChannelLines) -> str | None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    if not isinstance(lay, Layout) or not a.is_floating_point() or not lay.fits(tuple(a.shape)):
        return None
    ref = a
    for d in lay.varying_dims():
        keep = plan.kept_positions(lay, d, ref.shape[d])
        ref = ref.index_select(d, torch.as_tensor(keep, dtype=torch.long, device=ref.device))
    if ref.shape != b.shape:
        return f"shape {list(b.shape)} but expected {list(ref.shape)}"
    err = float((ref.float() - b.float()).abs().max()) if ref.numel() else 0.0
    if err > TOLERANCE * max(float(ref.abs().max()) if ref.numel() else 0.0, 1.0):
        return f"differs by {err:.3e}"
    return None


# -- the public oracle --------------------------------------------------------------------------
def verify(
    original: nn.Module,
    result: Any,
    example_inputs: Any,
    *,
    exact: bool | None = None,
) -> VerificationReport:
    """Check a pruning result against the masked original; raise ``VerificationError`` if wrong.

    ``result`` is what :func:`fxprune.prune` returned (``.module``, ``.kept``, and the
    groups). ``exact``: whether outputs must equal the masked original; by default,
    when no pruned group is inexact. Neither ``original`` nor ``result.module`` is
    modified. Returns a :class:`VerificationReport`.
    """
    if not isinstance(original, nn.Module):
        raise VerificationError(
            f"verify(original, result, example_inputs) needs the original torch.nn.Module, "
            f"got {type(original).__name__}."
        )
    kept = result.kept
    if exact is None:
        reason = inexact_reason(getattr(result, "groups", None) or [], kept, original)
    else:
        reason = None if exact else "the caller says a pruned group is inexact"
    graph_plan = getattr(result, "graph_plan", None)
    options = getattr(result, "trace_options", None) or {}

    def locate(masked: nn.Module, run: nn.Module) -> str | None:
        if graph_plan is None or not isinstance(run, fx.GraphModule):
            return None
        # Retraced the way the result was, the masked original has the pruned graph's node names.
        masked_gm = trace(
            masked,
            example_inputs,
            frontend=options.get("frontend", run.meta.get("fxprune.frontend", "fx")),
            leaf_modules=tuple(options.get("leaf_modules", ())),
            concrete_args=options.get("concrete_args") or None,
        )
        _eval(masked_gm)
        return first_divergence(masked_gm, run, example_inputs, graph_plan.plan, graph_plan.layouts)

    return check(original, result.module, kept, example_inputs, inexact=reason, locate=locate)
