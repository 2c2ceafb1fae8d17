"""CountDown as an optimum FX transformation, composable with optimum's others.

    from optimum.fx.optimization import compose
    from countdown_fx.integrations.optimum import CountDownTransformation
    gm = compose(OtherTransformation(), CountDownTransformation(calibration_or_config))(gm)
    dense = CountDownTransformation(...)(gm, reverse=True)

`transform` rewrites the sites (the same pass as the backend); `reverse` restores the exact graph it
started from (kept on the GraphModule) and drops the CountDown state buffers.
"""

from __future__ import annotations

from typing import Any

from torch import fx

try:
    from optimum.fx.optimization import ReversibleTransformation
except ImportError as e:  # optimum is optional
    raise ImportError(
        "countdown_fx.integrations.optimum needs optimum: pip install optimum (it must not pull a newer torch; "
        "install torch first)"
    ) from e

from ..passes.rewrite import DOWN_T_COPIES, STATE_PREFIX, refresh_down_t_on_call
from ..backend import transform
from ..sparsify import resolve_target

ORIGINAL_GRAPH = "countdown_fx.original_graph"


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    copy = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    copy.output(copy.graph_copy(graph, {}))  # graph_copy returns the copied output value
    copy._codegen = graph._codegen  # keeps the pytree calling convention of export / Dynamo graphs
    return copy


class CountDownTransformation(ReversibleTransformation):
    """Rewrite every gated FFN into a countdown op (reversibly).

    calibration_or_config: a CountDownConfig, a Calibration, a path to a saved calibration, or a dict of the
    backend's options (countdown_fx.sparsify says when to use one).
    Works on GraphModules from Dynamo capture (weights as placeholders, shapes from node meta) and from
    ExportedProgram.module() or fx.symbolic_trace (weights as attributes).
    """

    preserves_computation = False

    def __init__(self, calibration_or_config: Any):
        super().__init__()
        self.config, self.calibration = resolve_target(calibration_or_config)

    def transform(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        if not isinstance(graph_module, fx.GraphModule):
            raise TypeError(
                f"CountDownTransformation rewrites an fx.GraphModule (optimum's symbolic trace, "
                f"torch.fx.symbolic_trace(model), ExportedProgram.module()), got {type(graph_module).__name__}; for "
                "an nn.Module use torch.compile(model, backend='countdown', options=...)")
        if ORIGINAL_GRAPH in graph_module.meta:  # a second transform would keep the rewritten graph as "original"
            raise ValueError("this GraphModule is already transformed by CountDownTransformation; reverse it first "
                             "(transformation(gm, reverse=True)) to transform it again, e.g. with another "
                             "calibration")
        original = _copy_graph(graph_module.graph)
        refresh_down_t_on_call(transform(graph_module, None, self.config, self.calibration))
        graph_module.meta[ORIGINAL_GRAPH] = original
        for node in graph_module.graph.nodes:
            if "countdown_site" in node.meta:
                self.mark_as_transformed(node)
        return graph_module

    def reverse(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        original = graph_module.meta.pop(ORIGINAL_GRAPH, None)
        if original is None:
            raise ValueError("this GraphModule was not transformed by CountDownTransformation (or was copied "
                             "without its meta), so there is no original graph to restore")
        graph_module.graph = original
        graph_module.meta.pop(DOWN_T_COPIES, None)  # the buffers below go, and the pre-hook with nothing to copy
        for name in [n for n, _ in graph_module.named_buffers() if n.startswith(STATE_PREFIX)]:
            delattr(graph_module, name)
        return graph_module
