"""Capture what Dynamo sees of a model, so users and calibration look at the same graphs the backend gets."""

from __future__ import annotations

import collections
import warnings
from typing import Any

import torch
from torch import fx, nn

from .passes.match import SiteTable, match_sites


def refuse_compiled_forward(model: nn.Module) -> None:
    """A module whose forward was replaced by torch.compile(module.forward) (the README's generate recipe) runs its
    own compiled code, which no other backend sees: finding or calibrating its sites would see none."""
    for path, module in model.named_modules():
        if hasattr(vars(module).get("forward"), "_torchdynamo_orig_callable"):
            where = f"model.{path}.forward" if path else "model.forward"
            raise ValueError(
                f"{where} is already compiled (torch.compile({where})), so its sites cannot be found or calibrated "
                f"through it. Find sites and calibrate before compiling the forward, or on a model whose forward is "
                f"its own (del {where} restores it).")


def capture_graphs(model: nn.Module, *args: Any, **kwargs: Any) -> list[tuple[fx.GraphModule, list]]:
    """Run `model(*args, **kwargs)` once under Dynamo, returning every captured (graph, example_inputs)."""
    refuse_compiled_forward(model)
    graphs: list[tuple[fx.GraphModule, list]] = []

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=record, dynamic=False)(*args, **kwargs)
    return graphs


def find_sites(model_or_graph: Any, *args: Any, **kwargs: Any) -> SiteTable:
    """The gated FFN sites the backend would rewrite, as a table (key, d_model, d_inter, activation, layout).

    Accepts an nn.Module plus example inputs (captured through Dynamo, as torch.compile would), an
    fx.GraphModule (matched as it is), or a torch.export ExportedProgram.
    """
    if isinstance(model_or_graph, torch.export.ExportedProgram):
        return match_sites(model_or_graph.module())
    if isinstance(model_or_graph, fx.GraphModule) and not args and not kwargs:
        return match_sites(model_or_graph)
    if not isinstance(model_or_graph, nn.Module):
        raise TypeError(
            f"find_sites takes an nn.Module (with example inputs), an fx.GraphModule or an ExportedProgram; "
            f"got {type(model_or_graph).__name__}"
        )
    sites = SiteTable()
    for gm, example_inputs in capture_graphs(model_or_graph, *args, **kwargs):
        found = match_sites(gm, example_inputs)
        sites.extend(found)
        sites.left_dense.extend(found.left_dense)
    repeated = sorted(key for key, n in collections.Counter(s.key for s in sites).items() if n > 1)
    if repeated:
        warnings.warn(
            f"countdown: {len(repeated)} site key(s) appear in several captured graphs (first: {repeated[0]!r}): "
            "Dynamo compiled the module holding them on its own (a graph break inside a decoder layer or in the "
            "loop over layers), so their keys do not say which layer they are. Regime 'ideal' runs; calibration "
            "refuses such a model until the graph break is removed (TORCH_LOGS=graph_breaks names it).",
            stacklevel=2)
    return sites
