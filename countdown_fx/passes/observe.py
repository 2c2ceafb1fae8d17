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
import warnings
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..kernels import reference
from .match import Site, match_sites
from .rewrite import erase_unused, replace_site, site_input_nodes
from .weights import sample as weight_sample

log = logging.getLogger(__name__)

# callback(site_key, x [N, d_model], act_g [N, d_inter], u [N, d_inter]); N = the real tokens of the batch
SiteCallback = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


# What else makes Dynamo compile a model's submodules on their own, with no graph break in its code.
DYNAMO_AFTER_A_FAILED_CALL = (
    "If there is no graph break: an earlier call of this model that raised inside torch.compile (a misspelt "
    "keyword, say) can leave Dynamo compiling its submodules on their own from then on in this process; "
    "torch._dynamo.reset() clears that.")


class NoSiteReached(RuntimeError):
    """A calibration batch ran without reaching any gated FFN site."""


class SiteObserver(nn.Module):
    """Computes one gated FFN densely (as the reference does) and reports its tokens to the active session."""

    def __init__(self, info: dict, weights_stored: bool = True):
        super().__init__()
        self.key, self.activation, self.info = info["key"], info["activation"], info
        self.weights_stored = weights_stored  # parameters or graph inputs, not computed in forward (dequantised)

    def forward(self, x, w_gate, w_up, w_down, b_gate, b_up, b_down):
        act_g, u = reference.gate_up(x, w_gate, w_up, b_gate, b_up, self.activation)
        keep = (_ACTIVE[-1].report(self.info, x, act_g, u, (w_gate, w_up, w_down), identify=self.weights_stored)
                if _ACTIVE else None)
        h = act_g * u if keep is None else reference.keep_only(act_g * u, keep)
        return F.linear(h, w_down, b_down)


# The session whose batch is running. Observers look it up at run time instead of holding a session, so the
# graphs Dynamo compiled for one calibration serve the next ones too: one backend function for all
# sessions means no new cache entry per calibrate() call (Dynamo's recompile limit is 8 per function).
_ACTIVE: list["ObserveSession"] = []


def observer_backend(gm: fx.GraphModule, example_inputs):
    """Dynamo backend: every matched site becomes a SiteObserver; the rest of the graph runs as captured."""
    sites = match_sites(gm, example_inputs)
    for i, site in enumerate(sites):
        _instrument(gm, site, i, sites)
    if sites:
        gm.graph.lint()
        gm.recompile()
    log.info("countdown: observing %d site(s) in a captured graph", len(sites))
    return gm.forward


def _instrument(gm: fx.GraphModule, site: Site, index: int, sites: list[Site]) -> None:
    name = f"countdown_observer_{index}"
    refs = (site.gate_weight, site.up_weight, site.down_weight)
    stored = all(isinstance(r, str) or r.op in ("placeholder", "get_attr") for r in refs)
    gm.add_submodule(name, SiteObserver(site.describe(), weights_stored=stored))
    with gm.graph.inserting_before(site.output):
        new = gm.graph.call_module(name, site_input_nodes(gm, site))
        replace_site(gm, site, new, sites)
    erase_unused(gm.graph, site.output, stop=site.x)


class ObserveSession:
    """One observed model: the Dynamo-compiled wrapper, the sites seen, and the current callback.

    Set `callback` before each pass over the data; `run(batch)` calls the model on one batch (a tensor
    of input_ids or a dict of keyword arguments) and returns the number of site calls observed, which
    calibrate uses to detect a graph that silently fell back to eager (no observation at all).
    With a `selector` (key, x, act_g, u, real rows or None -> bool keep mask [N, d_inter] over all N tokens) every
    site runs sparse instead, as a deployed model does, so later sites see the inputs the earlier sparse ones give.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites: dict[str, dict] = {}
        self.owners: dict[str, tuple] = {}  # key -> data pointers of the weights first reported under it
        self.keys_of_owner: dict[tuple, list[str]] = {}  # weights' data pointers -> the keys they report under
        self.renamed: set[tuple[str, str]] = set()  # (first key, other key) pairs seen
        self.callback: SiteCallback | None = None
        self.selector: Callable[..., torch.Tensor] | None = None  # (key, x, act_g, u, real rows or None)
        self.token_mask: torch.Tensor | None = None
        self.calls = 0
        self.compiled = torch.compile(model, backend=observer_backend)

    def report(self, info: dict, x: torch.Tensor, act_g: torch.Tensor, u: torch.Tensor,
               weights: tuple | None = None, identify: bool = True) -> torch.Tensor | None:
        """Hand the real tokens to the callback; return the selector's keep mask (shaped as act_g), if any.
        The first call of a site also samples its (unsharded) weights (passes.weights), saved with the
        calibration so that deploying it on other weights is refused. identify: the weights' data pointers say
        which FFN this is (not so for weights computed in forward, new tensors at every call)."""
        self.calls += 1
        owner = tuple(w.data_ptr() for w in weights) if weights is not None and identify else None  # which FFN
        key = info["key"] if owner is None else self._first_key(info["key"], owner)
        info = {**info, "key": key}
        if key not in self.sites:
            found = weights is not None and info.get("shard", "-") == "-"
            self.sites[key] = {**info, "weight_sample": weight_sample(*weights) if found else None}
        if owner is not None:
            self._check_one_ffn_per_key(key, owner)
        known = self.sites[key]
        if (known["d_model"], known["d_inter"]) != (info["d_model"], info["d_inter"]):
            raise ValueError(f"site {key!r} appears in two graphs with different shapes: {known} vs {info}")
        shape = act_g.shape
        real = self.real_rows(x)  # from x as the FFN got it: its shape says how its rows line up with the mask
        x, act_g, u = (t.reshape(-1, t.shape[-1]) for t in (x, act_g, u))
        selected = self.selector(key, x, act_g, u, real) if self.selector is not None else None
        if self.callback is not None:
            if real is not None:
                x, act_g, u = x[real], act_g[real], u[real]
            self.callback(key, x, act_g, u)
        return None if selected is None else selected.reshape(shape)

    def _first_key(self, key: str, owner: tuple) -> str:
        """The key these weights were reported under before, where `key` is that key's path seen from a module
        inside it or around it (the one such key): a batch whose keyword arguments cause a graph break
        (output_hidden_states=True in some transformers versions) has Dynamo compile a submodule as its own frame,
        whose site paths are relative to it ('layers.0.mlp' for 'model.layers.0.mlp'). Counted as the site it is,
        with a warning.
        Keys not so related are other sites sharing weights (one FFN called twice, 'mlp' and 'mlp#1') and stay
        apart, as does a key related to two (one FFN shared by two modules: which one is it?)."""
        known = self.keys_of_owner.setdefault(owner, [])
        related = [k for k in known if k == key or k.endswith("." + key) or key.endswith("." + k)]
        if key in known or len(related) != 1:  # new, or ambiguous (one FFN shared by two modules): apart
            if key not in known:
                known.append(key)
            return key
        first = related[0]
        if not self.renamed:  # once: every site of such a batch is renamed alike
            warnings.warn(
                f"countdown: calibration saw the FFN of site {first!r} (and likely others) under the key {key!r} in a "
                "later batch: that batch compiled with a graph break (Dynamo compiled a submodule as its own frame, "
                "which names sites from there; an extra keyword such as output_hidden_states=True can cause it). Its "
                "tokens count "
                f"toward {first!r}. Calibrate with the keywords you deploy with.", stacklevel=4)
        self.renamed.add((first, key))
        return first

    def _check_one_ffn_per_key(self, key: str, owner: tuple) -> None:
        """Refuse two FFNs (other weights) reported under one key: one state for both would be fitted on their
        pooled tokens and deployed on each, far from the target sparsity per layer with a plausible mean. It
        happens where Dynamo compiles a module that holds an FFN as its own frame (a graph break inside a
        decoder layer or in the loop over layers): site keys are paths from the compiled frame, so every
        layer's FFN is then "mlp"."""
        first = self.owners.setdefault(key, owner)
        if first != owner:
            raise ValueError(
                f"calibration: two FFNs with other weights report the same site key {key!r}. Site keys are module "
                "paths from the frame Dynamo compiles, and a graph break inside the module that holds the FFNs (a "
                "decoder layer), or in the loop over them, makes Dynamo compile each such module on its own, where "
                "every layer's FFN has the same path. One calibrated state cannot serve them all. Remove the graph "
                "break (TORCH_LOGS=graph_breaks names it; torch.compile(..., fullgraph=True) fails at it); "
                "regime 'ideal' needs no calibration and runs either way. " + DYNAMO_AFTER_A_FAILED_CALL)

    def real_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which rows of a site's input x [..., d_model], flattened, are real tokens (the batch's attention mask),
        or None for all of them."""
        return real_token_rows(self.token_mask, x)

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


def real_token_rows(token_mask, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which rows of a site's input x ([..., d_model], flattened to [tokens, d_model]) are real tokens, by the call's
    attention mask: [batch, seq] (1 = real), or the [batch, 1, queries, keys] form transformers hands a model with
    a static cache (bool, or additive: 0 where attended), also inside the dict of such masks some models get.
    From a 4-D mask, a query is real where it attends its own key (at `positions`, the call's cache_position;
    without it, read off the mask: _attends_itself): a padded position's key is masked for every query, itself
    included, with left and right padding alike. None (all real) without a usable mask,
    or where it does not cover these rows (a decode step's [batch, seq] mask spans the cached tokens too).
    x's leading dims must be the mask's [batch, seq] (a flat [tokens, d_model] input is taken batch-major), or
    [seq, batch] (a sequence-first model: the mask is transposed to its order); other layouts count every row."""
    if isinstance(token_mask, Mapping):
        token_mask = token_mask.get("full_attention",
                                    next((m for m in token_mask.values() if isinstance(m, torch.Tensor)), None))
    if not isinstance(token_mask, torch.Tensor):  # absent, or a form not read here (flex attention's BlockMask)
        return None
    if token_mask.dim() == 4 and token_mask.shape[1] == 1:
        token_mask = _attends_itself(token_mask, positions)
        if token_mask is None:
            return None
    lead = tuple(x.shape[:-1])
    if token_mask.numel() != x.numel() // max(x.shape[-1], 1):
        return None
    if len(lead) > 1 and lead != tuple(token_mask.shape):
        if token_mask.dim() != 2 or lead != tuple(token_mask.shape[::-1]):
            return None
        token_mask = token_mask.t()  # [seq, batch], as the rows of a sequence-first input
    return token_mask.reshape(-1).to(x.device).bool()


def _attends_itself(mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
    """[batch, queries]: whether each query of a [batch, 1, queries, keys] mask attends the key at its own
    position. Without positions, a row's queries sit at consecutive keys from an offset, which the mask gives:
    in a causal mask a real query's last attended key is its own, so offset = max over queries of (last attended
    key - query index) (a padded query attends nothing, or only keys before its own). None where the mask is not
    of that form (a query attending keys past its position: not causal)."""
    queries, keys = mask.shape[-2:]
    attends = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    index = torch.arange(queries, device=mask.device)
    if positions is not None and positions.numel() == queries:
        positions = positions.reshape(1, -1).to(device=mask.device, dtype=torch.long).expand(attends.shape[0], -1)
    else:
        last = torch.where(attends, torch.arange(keys, device=mask.device), -1).amax(-1)  # [batch, queries]
        positions = (last - index).amax(-1, keepdim=True) + index
    inside = (positions >= 0) & (positions < keys)
    if ((~inside) & attends.any(-1)).any():
        return None
    own = attends.gather(-1, positions.clamp(0, keys - 1).unsqueeze(-1)).squeeze(-1)
    return own & inside


def _call_args(batch) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    raise TypeError(f"a calibration batch must be a LongTensor of input_ids or a dict of model kwargs, "
                    f"got {type(batch).__name__}")


def run_pass(session: ObserveSession, batches: Iterable, callback: SiteCallback, desc: str,
             progress: bool = True, total: int | None = None, selector=None) -> int:
    """One pass over `batches` with `callback` at every site (and every site sparse by `selector`, if given:
    see ObserveSession); returns the number of batches run.

    Raises RuntimeError when a batch reaches no site: Dynamo fell back to eager (e.g. its recompile limit
    was hit) or the model has no gated FFN, and a calibration from such a pass would be silently empty.
    """
    from tqdm.auto import tqdm

    session.callback, session.selector = callback, selector
    n = 0
    try:
        for batch in tqdm(batches, desc=desc, total=total, disable=not progress, unit="batch"):
            if session.run(batch) == 0:
                raise NoSiteReached(
                    "countdown: a calibration batch reached no gated FFN site. Either the model has none "
                    "(countdown_fx.find_sites(model, inputs) lists them) or Dynamo ran it eagerly because its "
                    "recompile limit was hit; call torch._dynamo.reset() or raise "
                    "torch._dynamo.config.recompile_limit, and use batches of one shape"
                )
            n += 1
    finally:
        session.callback = session.selector = None
    return n

