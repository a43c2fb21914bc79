"""The layer inventory: one `LayerInfo` row per parameterised layer of any opened model.

Rows are built from ``named_parameters()`` grouped by owning module, so every format yields
the same names: eager modules and TorchScript (type from ``original_name``) directly,
``torch.export`` GraphModules through the ``nn_module_stack`` the exporter records on graph
nodes, and weights-only checkpoints by guessing the type from names and shapes (such types
end in ``"?"``, e.g. ``"Linear?"``).

- Linear / Conv / Embedding: one row named after the module, ``tensor = "<module>.weight"``,
  ``params`` = weight + bias.
- LSTM / GRU / RNN: one row per weight matrix (``"lstm.weight_ih_l0"``) with its bias.
- MultiheadAttention: a row for ``in_proj_weight`` (with ``in_proj_bias``); its ``out_proj`` is
  an ordinary Linear row.
- BatchNorm / LayerNorm / GroupNorm...: listed, ``prunable=False``.
- Any other parameter (a positional embedding ``nn.Parameter``): its own row, type
  ``"Parameter"``, ``prunable=False``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from core.base.model import LayerInfo, LoadedModel

#: Types whose single ``weight`` is the compressible tensor.
WEIGHT_TYPES = {
    "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "Embedding", "EmbeddingBag",
    # transformers' GPT-2 style Conv1D: a Linear with its weight stored [in, out].
    "Conv1D",
}  # fmt: skip
RNN_TYPES = {"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"}
ATTENTION_TYPES = {"MultiheadAttention"}
#: Renames of subclasses that behave exactly like their base for compression.
TYPE_ALIASES = {"NonDynamicallyQuantizableLinear": "Linear", "LazyLinear": "Linear"}
_ATTN_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype(t: torch.Tensor) -> str:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:  # one shared string per dtype (10**6 rows)
        name = _DTYPE_NAMES[t.dtype] = str(t.dtype).replace("torch.", "")
    return name


def _owner(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def _clean_type(type_name: str) -> str:
    short = type_name.rsplit(".", 1)[-1]
    return TYPE_ALIASES.get(short, short)


def _is_norm(type_name: str) -> bool:
    base = type_name.rstrip("?")
    return "Norm" in base


# --------------------------------------------------------------------------- type resolution


def _eager_types(module: nn.Module) -> dict[str, str]:
    types = {}
    for path, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            name = getattr(sub, "original_name", None) or type(sub).__name__
        else:
            name = type(sub).__name__
        types[path] = _clean_type(str(name))
    return types


_GETATTR = re.compile(r"getattr\(([^,]+),\s*'([^']+)'\)")
_MODULES_INDEX = re.compile(r"\._modules\['([^']+)'\]")


def _clean_stack_path(path: str) -> str:
    """Normalise an ``nn_module_stack`` path (``"L['self'].layers.0"``, ``"getattr(...)"``)."""
    while _GETATTR.search(path):
        path = _GETATTR.sub(lambda m: f"{m.group(1)}.{m.group(2)}", path)
    path = _MODULES_INDEX.sub(lambda m: f".{m.group(1)}", path)
    for prefix in ("L['self'].", "L['self']", "L__self__.", "L__self___", "self."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path.strip(".")


def _graph_types(module: torch.fx.GraphModule) -> tuple[dict[str, str], dict[str, int]]:
    """(module path -> type, weight param name -> conv groups) from an exported graph."""
    types: dict[str, str] = {}
    groups: dict[str, int] = {}
    for node in module.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for value in stack.values():
            if isinstance(value, tuple) and len(value) == 2:
                path, type_name = value
                type_str = type_name if isinstance(type_name, str) else type_name.__name__
                types.setdefault(_clean_stack_path(str(path)), _clean_type(type_str))
        if node.op == "call_function":
            target = str(node.target)
            idx = None
            if target.startswith("aten.conv") and "convolution" not in target:
                idx = 6
            elif target.startswith("aten.convolution"):
                idx = 8
            if idx is not None and len(node.args) > 1:
                weight = node.args[1]
                if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                    g = node.args[idx] if len(node.args) > idx else node.kwargs.get("groups", 1)
                    if isinstance(g, int):
                        groups[str(weight.target)] = g
    types.setdefault("", _clean_type(type(module).__name__))
    return types, groups


def _guess_type(owner: str, leaves: Mapping[str, torch.Tensor]) -> str:
    """Type of a weights-only module from its tensors' names and shapes (ends in ``"?"``)."""
    if any(k.startswith("weight_ih") for k in leaves):
        ih = next(v for k, v in leaves.items() if k.startswith("weight_ih"))
        hh = next((v for k, v in leaves.items() if k.startswith("weight_hh")), None)
        if hh is not None and hh.ndim == 2 and hh.shape[1] > 0:
            ratio = ih.shape[0] // hh.shape[1]
            return {4: "LSTM?", 3: "GRU?"}.get(ratio, "RNN?")
        return "RNN?"
    if any(k in leaves for k in _ATTN_WEIGHTS):
        return "MultiheadAttention?"
    weight = leaves.get("weight")
    if weight is None:
        return "Parameter?"
    if weight.ndim == 1:
        return "BatchNorm?" if "running_mean" in leaves else "LayerNorm?"
    if weight.ndim == 2:
        last = owner.rsplit(".", 1)[-1].lower()
        return "Embedding?" if "emb" in last or "wte" in last or "wpe" in last else "Linear?"
    return {3: "Conv1d?", 4: "Conv2d?", 5: "Conv3d?"}.get(weight.ndim, "Parameter?")


# --------------------------------------------------------------------------- rows


def _row(
    name: str,
    type_name: str,
    tensor_name: str | None,
    tensors: dict[str, torch.Tensor],
    param_names: list[str],
    prunable: bool,
    groups: int = 1,
) -> LayerInfo:
    main = tensors[tensor_name] if tensor_name is not None else tensors[param_names[0]]
    members = [tensors[p] for p in param_names]
    if len(members) == 1:  # most rows (10**6 for some checkpoints): no generator overhead
        params = main.numel() if members[0] is main else members[0].numel()
        nbytes = params * members[0].element_size()
    else:
        params = sum(t.numel() for t in members)
        nbytes = _nbytes(members)
    return LayerInfo(
        name=name,
        type=type_name,
        tensor=tensor_name,
        shape=tuple(main.shape),  # torch.Size holds ints
        params=params,
        bytes=nbytes,
        prunable=prunable,
        param_names=tuple(param_names),
        groups=int(groups),
        dtype=_dtype(main),
    )


def _compressible(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.ndim >= 2


def _rows_for_owner(
    owner: str,
    type_name: str,
    leaves: dict[str, torch.Tensor],
    groups_of: Callable[[str], int],
) -> list[LayerInfo]:
    def full(leaf: str) -> str:
        return f"{owner}.{leaf}" if owner else leaf

    tensors = {full(k): v for k, v in leaves.items()}
    base = type_name.rstrip("?")
    rows: list[LayerInfo] = []
    used: set[str] = set()

    if base in WEIGHT_TYPES and "weight" in leaves:
        members = [full(k) for k in ("weight", "bias") if k in leaves]
        used.update(("weight", "bias"))
        rows.append(
            _row(
                owner or full("weight"),
                type_name,
                full("weight"),
                tensors,
                members,
                _compressible(leaves["weight"]),
                groups_of(full("weight")),
            )
        )
    elif base in RNN_TYPES:
        for leaf, t in leaves.items():
            if not leaf.startswith("weight_"):
                continue
            bias = "bias_" + leaf[len("weight_") :]
            members = [full(leaf)] + ([full(bias)] if bias in leaves else [])
            used.update((leaf, bias))
            rows.append(_row(full(leaf), type_name, full(leaf), tensors, members, _compressible(t)))
    elif base in ATTENTION_TYPES:
        for leaf in _ATTN_WEIGHTS:
            if leaf not in leaves:
                continue
            members = [full(leaf)]
            if leaf == "in_proj_weight" and "in_proj_bias" in leaves:
                members.append(full("in_proj_bias"))
                used.add("in_proj_bias")
            used.add(leaf)
            rows.append(
                _row(
                    full(leaf), type_name, full(leaf), tensors, members, _compressible(leaves[leaf])
                )
            )
    elif _is_norm(type_name) and leaves:
        tensor = full("weight") if "weight" in leaves else None
        members = [full(k) for k in leaves]
        used.update(leaves)
        rows.append(_row(owner or members[0], type_name, tensor, tensors, members, False))

    bare_type = "Parameter?" if type_name.endswith("?") else "Parameter"
    for leaf in leaves:
        if leaf in used:
            continue
        rows.append(_row(full(leaf), bare_type, full(leaf), tensors, [full(leaf)], False))
    return rows


def inventory(loaded: LoadedModel) -> tuple[LayerInfo, ...]:
    """Every parameterised layer of ``loaded``, in parameter order.

    Parameters
    ----------
    loaded
        Any opened model (eager, TorchScript, ``.pt2`` GraphModule, weights-only).

    Returns
    -------
    tuple of LayerInfo
        ``name`` keys plans/stats/masks; ``tensor`` is the compressible parameter's full name.
    """
    return tuple(iter_inventory(loaded))


def iter_inventory(loaded: LoadedModel) -> Iterator[LayerInfo]:
    """`inventory`'s rows one at a time: a caller that streams them (``inspect`` of 10**6
    tensors) never holds them all."""
    module = loaded.module
    if loaded.weights_only and _owners_contiguous(module):
        yield from _iter_weights_only(module)
        return
    params = dict(module.named_parameters())
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in params.items():
        owner, leaf = _owner(name)
        by_owner.setdefault(owner, {})[leaf] = t

    conv_groups: dict[str, int] = {}
    if loaded.weights_only:
        # buffers grouped by owner once: scanning them per owner is quadratic in a checkpoint
        # with 10**5 tensors
        buffers_of: dict[str, dict[str, torch.Tensor]] = {}
        for bname, b in module.named_buffers():
            b_owner, b_leaf = _owner(bname)
            buffers_of.setdefault(b_owner, {})[b_leaf] = b

        def type_of(owner: str) -> str:
            leaves = dict(by_owner.get(owner, {}))
            for b_leaf, b in buffers_of.get(owner, {}).items():
                leaves.setdefault(b_leaf, b)
            return _guess_type(owner, leaves)

        def groups_of(name: str) -> int:
            return 1

    else:
        if isinstance(module, torch.fx.GraphModule) and not isinstance(
            module, torch.jit.ScriptModule
        ):
            types, conv_groups = _graph_types(module)
        else:
            types = _eager_types(module)
        submodules = dict(module.named_modules())

        def type_of(owner: str) -> str:
            found = types.get(owner)
            if found is not None and found not in ("Module", "GraphModule"):
                return found
            parent, _, leaf = owner.rpartition(".")
            if leaf == "out_proj" and types.get(parent) in ATTENTION_TYPES:
                return "Linear"
            if found is None:
                return _guess_type(owner, by_owner.get(owner, {}))
            return "Parameter"

        def groups_of(name: str) -> int:
            if name in conv_groups:
                return conv_groups[name]
            sub = submodules.get(_owner(name)[0])
            g = getattr(sub, "groups", 1) if sub is not None else 1
            return g if isinstance(g, int) else 1

    for owner, leaves in by_owner.items():
        yield from _rows_for_owner(owner, type_of(owner), leaves, groups_of)


def _owners_contiguous(module: nn.Module) -> bool:
    """True when each owner's parameters are one run of ``named_parameters()`` (always so for
    `core.io.model_io.WeightsOnlyModule`, which lists names in module-tree order)."""
    seen: set[str] = set()
    last = None
    for name, _ in module.named_parameters():
        owner = name.rpartition(".")[0]
        if owner != last:
            if owner in seen:
                return False
            seen.add(owner)
            last = owner
    return True


def _iter_weights_only(module: nn.Module) -> Iterator[LayerInfo]:
    """The weights-only rows, owner by owner, without a dict of every owner's tensors: same
    rows, same order as the general path (owners in first-appearance order)."""
    buffers_of: dict[str, dict[str, torch.Tensor]] = {}
    for bname, b in module.named_buffers():
        b_owner, b_leaf = _owner(bname)
        buffers_of.setdefault(b_owner, {})[b_leaf] = b

    def groups_of(name: str) -> int:
        return 1

    last: str | None = None
    leaves: dict[str, torch.Tensor] = {}
    for name, t in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner != last:
            if last is not None:
                yield from _weights_only_rows(last, leaves, buffers_of, groups_of)
            last, leaves = owner, {}
        leaves[leaf] = t
    if last is not None:
        yield from _weights_only_rows(last, leaves, buffers_of, groups_of)


def _weights_only_rows(
    owner: str,
    leaves: dict[str, torch.Tensor],
    buffers_of: dict[str, dict[str, torch.Tensor]],
    groups_of: Callable[[str], int],
) -> list[LayerInfo]:
    typed = leaves
    extra = buffers_of.get(owner)
    if extra:
        typed = dict(leaves)
        for b_leaf, b in extra.items():
            typed.setdefault(b_leaf, b)
    return _rows_for_owner(owner, _guess_type(owner, typed), leaves, groups_of)


def prunable_layers(loaded: LoadedModel) -> tuple[LayerInfo, ...]:
    """The inventory rows with ``prunable=True`` (weights of Linear/Conv/Embedding/RNN/MHA)."""
    return tuple(r for r in inventory(loaded) if r.prunable)


def float_param_count(module: nn.Module) -> int:
    """Number of floating-point parameter values (the ``total_params`` of ``inspect``)."""
    return sum(p.numel() for p in module.parameters() if p.is_floating_point())
