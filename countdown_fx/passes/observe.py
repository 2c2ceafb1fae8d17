"""Calibration instrumentation: run a model densely through the backend's graph path, with an observer at
every gated FFN site.

Why a graph pass and not module hooks: calibration must see exactly the sites the backend will rewrite,
keyed the same way (the matcher's module paths), on any model the matcher understands. So a Dynamo
backend matches the sites of each captured graph and replaces each one by a `SiteObserver` submodule
that computes the same dense FFN and hands (x, act(g), u) of the real tokens to a callback. Callbacks
reduce what they need on the fly; nothing is stored between batches here.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..kernels import reference
from .match import Site, match_sites
from .rewrite import erase_unused, replace_site, site_input_nodes

log = logging.getLogger(__name__)

# callback(site_key, x [N, d_model], act_g [N, d_inter], u [N, d_inter]); N = the real tokens of the batch
SiteCallback = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


class SiteObserver(nn.Module):
    """Computes one gated FFN densely (as the reference does) and reports its tokens to the active session."""

    def __init__(self, info: dict):
        super().__init__()
        self.key, self.activation, self.info = info["key"], info["activation"], info

    def forward(self, x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        act_g, u = reference.gate_up(x, w_gate, w_up, b_gate, b_up, self.activation)
        if _ACTIVE:
            _ACTIVE[-1].report(self.info, x, act_g, u)
        return F.linear(act_g * u, w_down, b_down)


# The session whose batch is running. Observers look it up at run time instead of holding a session, so the
# graphs Dynamo compiled for one calibration serve the next ones too: one backend function for all
# sessions means no new cache entry per calibrate() call (Dynamo's recompile limit is 8 per function).
_ACTIVE: list["ObserveSession"] = []


def observer_backend(gm: fx.GraphModule, example_inputs):
    """Dynamo backend: every matched site becomes a SiteObserver; the rest of the graph runs as captured."""
    sites = match_sites(gm, example_inputs)
    for i, site in enumerate(sites):
        _instrument(gm, site, i)
    if sites:
        gm.graph.lint()
        gm.recompile()
    log.info("countdown: observing %d site(s) in a captured graph", len(sites))
    return gm.forward


def _instrument(gm: fx.GraphModule, site: Site, index: int) -> None:
    name = f"countdown_observer_{index}"
    gm.add_submodule(name, SiteObserver(site.describe()))
    with gm.graph.inserting_before(site.output):
        new = gm.graph.call_module(name, site_input_nodes(gm, site))
        replace_site(gm, site, new)
    erase_unused(gm.graph, site.output, stop=site.x)


class ObserveSession:
    """One observed model: the Dynamo-compiled wrapper, the sites seen, and the current callback.

    Set `callback` before each pass over the data; `run(batch)` calls the model on one batch (a tensor
    of input_ids or a dict of keyword arguments) and returns the number of site calls observed, which
    calibrate uses to detect a graph that silently fell back to eager (no observation at all).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites: dict[str, dict] = {}
        self.callback: SiteCallback | None = None
        self.token_mask: torch.Tensor | None = None
        self.calls = 0
        self.compiled = torch.compile(model, backend=observer_backend)

    def report(self, info: dict, x: torch.Tensor, act_g: torch.Tensor, u: torch.Tensor) -> None:
        self.calls += 1
        key = info["key"]
        known = self.sites.setdefault(key, info)
        if (known["d_model"], known["d_inter"]) != (info["d_model"], info["d_inter"]):
            raise ValueError(f"site {key!r} appears in two graphs with different shapes: {known} vs {info}")
        if self.callback is None:
            return
        x, act_g, u = (t.reshape(-1, t.shape[-1]) for t in (x, act_g, u))
        mask = self.token_mask
        if mask is not None and mask.numel() == x.shape[0]:
            keep = mask.reshape(-1).to(x.device).bool()
            x, act_g, u = x[keep], act_g[keep], u[keep]
        self.callback(key, x, act_g, u)

    @torch.no_grad()
    def run(self, batch) -> int:
        """Run one batch densely through the observed graphs; returns the number of site calls seen."""
        self.calls = 0
        args, kwargs = _call_args(batch)
        self.token_mask = kwargs.get("attention_mask")
        _ACTIVE.append(self)
        try:
            self.compiled(*args, **kwargs)
        finally:
            _ACTIVE.pop()
            self.token_mask = None
        return self.calls


def _call_args(batch) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    raise TypeError(f"a calibration batch must be a LongTensor of input_ids or a dict of model kwargs, "
                    f"got {type(batch).__name__}")


def run_pass(session: ObserveSession, batches: Iterable, callback: SiteCallback, desc: str,
             progress: bool = True, total: int | None = None) -> int:
    """One pass over `batches` with `callback` at every site; returns the number of batches run.

    Raises RuntimeError when a batch reaches no site: Dynamo fell back to eager (e.g. its recompile limit
    was hit) or the model has no gated FFN, and a calibration from such a pass would be silently empty.
    """
    from tqdm.auto import tqdm

    session.callback = callback
    n = 0
    try:
        for batch in tqdm(batches, desc=desc, total=total, disable=not progress, unit="batch"):
            if session.run(batch) == 0:
                raise RuntimeError(
                    "countdown: a calibration batch reached no gated FFN site. Either the model has none "
                    "(countdown_fx.find_sites(model, inputs) lists them) or Dynamo ran it eagerly because its "
                    "recompile limit was hit; call torch._dynamo.reset() or raise "
                    "torch._dynamo.config.recompile_limit, and use batches of one shape"
                )
            n += 1
    finally:
        session.callback = None
    return n

