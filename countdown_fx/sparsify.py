"""`sparsify`: the CountDown rewrite as an explicit transformation, for export pipelines.

    ep = torch.export.export(model, (ids,), dynamic_shapes=...)
    ep = countdown_fx.sparsify(ep, calibration_or_config)      # same ops, state as program buffers
    torch.export.save(ep, "model.pt2")                         # loads where countdown_fx is imported

The same match + rewrite as the torch.compile backend; only the way in differs.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import fx
from torch.export import Dim, ExportedProgram

from .backend import has_countdown_ops, resolve, transform
from .passes.rewrite import refresh_down_t_on_call
from .config import CountDownConfig


def resolve_target(calibration_or_config: Any) -> tuple[CountDownConfig, Any]:
    """(config, calibration) from a CountDownConfig, a Calibration, a path to a saved calibration, or a dict
    of the backend's options. A config states the fields passed to it (CountDownConfig.stated_fields), a dict
    its keys: stated values win over the calibration's where they do not contradict it, and are refused where
    they do."""
    if isinstance(calibration_or_config, Mapping):
        return resolve(calibration_or_config)
    if isinstance(calibration_or_config, CountDownConfig):
        return resolve({"config": calibration_or_config})
    from .calibration import Calibration

    if not isinstance(calibration_or_config, (Calibration, str, os.PathLike)):
        raise TypeError(
            f"expected a Calibration, a path to a saved one, a CountDownConfig or a dict of the backend's options, "
            f"got {type(calibration_or_config).__name__}" + (" (was the result of calibrate() assigned?)"
                                                             if calibration_or_config is None else ""))
    return resolve({"calibration": calibration_or_config})


def _dynamic_shapes(ep: ExportedProgram):
    """The dims that were dynamic at export, as Dim.DYNAMIC markers in the inputs' pytree structure."""
    user_inputs = [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    flat = []
    for name in user_inputs:
        val = nodes[name].meta.get("val")
        if isinstance(val, torch.Tensor):
            flat.append({i: Dim.DYNAMIC for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt)} or None)
        else:
            flat.append(None)
    args_spec = ep.call_spec.in_spec
    args, kwargs = torch.utils._pytree.tree_unflatten(flat, args_spec)
    return args, kwargs


def sparsify_exported(ep: ExportedProgram, config: CountDownConfig, calibration=None) -> ExportedProgram:
    """Rewrite an ExportedProgram: unlift it to a GraphModule, rewrite, export again keeping the
    dims that were dynamic dynamic. The new state becomes buffers of the program. An exported program is
    for inference (saved, packaged by AOTInductor), so W_down^T is stored whatever the grad mode."""
    if ep.example_inputs is None:
        raise ValueError("this ExportedProgram carries no example inputs; export it with torch.export.export "
                         "(which records them) before calling sparsify")
    args, kwargs = ep.example_inputs
    dyn_args, dyn_kwargs = _dynamic_shapes(ep)
    is_dynamic = any(d is not None for d in torch.utils._pytree.tree_leaves((dyn_args, dyn_kwargs),
                                                                        is_leaf=lambda x: x is None))
    # warns when there is nothing to rewrite, and where a dynamic dim changes what a compiled package can decide
    gm = transform(ep.module(), None, config, calibration, exported=True, keep_grad=False)
    if not has_countdown_ops(gm):
        return ep
    dynamic = None
    if is_dynamic:
        dynamic = {**dict(zip(_arg_names(gm, len(args)), dyn_args)), **dyn_kwargs}
    return torch.export.export(gm, tuple(args), kwargs, dynamic_shapes=dynamic, strict=False)


def _arg_names(gm, n: int) -> list[str]:
    import inspect

    return list(inspect.signature(gm.forward).parameters)[:n]


def sparsify(obj: Any, calibration_or_config: Any, *, example_inputs: Sequence | None = None):
    """Rewrite every gated FFN of an fx.GraphModule (in place) or a torch.export ExportedProgram (a new
    program) into countdown ops; returns the same kind of object.

    calibration_or_config: a CountDownConfig (regime "ideal", or "prac" with its calibration), a
    Calibration, a path to a saved calibration (regime "prac", method and sparsity from the file), or a dict of
    the backend's options (e.g. {"calibration": path, "apply_to": "all"}).
    A GraphModule may be trained afterwards: where W_down requires grad and grad mode is on, it keeps its
    gradient (with a warning that the CUDA kernels then copy it per call); sparsify under torch.no_grad() for
    inference.
    """
    config, calibration = resolve_target(calibration_or_config)
    if isinstance(obj, ExportedProgram):
        return sparsify_exported(obj, config, calibration)
    if isinstance(obj, fx.GraphModule):
        return refresh_down_t_on_call(transform(obj, example_inputs, config, calibration))
    raise TypeError(
        f"sparsify takes an fx.GraphModule or a torch.export.ExportedProgram, got {type(obj).__name__}; "
        "for an nn.Module use torch.compile(model, backend='countdown', options=...) or export it first"
    )
