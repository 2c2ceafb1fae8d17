"""The `countdown` torch.compile backend: find the gated FFNs, rewrite them, hand the graph to Inductor.

    torch.compile(model, backend="countdown", options={"method": "m-countdown", "sparsity": 0.7})

`options` maps one-to-one onto CountDownConfig (plus "calibration": a Calibration or a path). The
backend is registered through the `torch_dynamo_backends` entry point, so the string works without
importing countdown_fx; `countdown_fx.backend.countdown_backend` is the same function.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from .config import CountDownConfig
from .passes.match import match_sites
from .passes.rewrite import counters, rewrite_sites

log = logging.getLogger(__name__)

NO_SITE_WARNING = (
    "countdown: no gated FFN (gate -> act -> * up -> down) was found in a graph Dynamo captured, so it runs "
    "unchanged (dense) through Inductor. If the model has graph breaks, its other graphs may still be "
    "sparsified: countdown_fx.find_sites(model, *inputs) lists what is found."
)


def resolve(options: Mapping[str, Any] | None) -> tuple[CountDownConfig, Any]:
    """(config, calibration) from backend options. A calibration supplies method, sparsity and regime
    unless the options name them; options that contradict the calibration are refused."""
    config = CountDownConfig.from_options(options)
    calibration = config.calibration
    if calibration is None:
        return config, None
    if isinstance(calibration, (str, os.PathLike)):
        from .calibration import Calibration

        calibration = Calibration.load(calibration)
    given = dict(options or {})
    cal_cfg = calibration.config
    for key in ("method", "sparsity", "threshold_rule", "predictor_rank"):
        if key in given and given[key] != getattr(cal_cfg, key):
            raise ValueError(
                f"option {key}={given[key]!r} contradicts the calibration, which was made with "
                f"{key}={getattr(cal_cfg, key)!r}; calibrate again for {key}={given[key]!r} or drop the option"
            )
    changes = {"method": cal_cfg.method, "sparsity": cal_cfg.sparsity, "threshold_rule": cal_cfg.threshold_rule,
               "predictor_rank": cal_cfg.predictor_rank, "calibration": calibration}
    if "regime" not in given:
        changes["regime"] = "prac"
    if "apply_to" not in given:
        changes["apply_to"] = cal_cfg.apply_to
    if "tau" not in given:
        changes["tau"] = cal_cfg.tau
    return config.replace(**changes), calibration


def transform(gm: fx.GraphModule, example_inputs: Sequence, config: CountDownConfig, calibration=None) -> fx.GraphModule:
    """The graph pass alone: match + rewrite (no Inductor). Warns once when there is nothing to rewrite."""
    sites = match_sites(gm, example_inputs)
    counters["sites_found"] += len(sites)
    if not sites:
        counters["graphs_without_sites"] += 1
        warnings.warn(NO_SITE_WARNING, stacklevel=2)
        return gm
    return rewrite_sites(gm, sites, config, calibration, example_inputs)


def inductor_patches(config: CountDownConfig, dynamic: bool = False) -> dict:
    patches = dict(torch._inductor.list_mode_options(config.mode, dynamic)) if config.mode else {}
    patches.update(config.inductor_options)
    return patches


def countdown_backend(gm: fx.GraphModule, example_inputs: Sequence, options: Mapping | None = None,
                      mode: str | None = None):
    """torch.compile backend. `mode` is torch.compile's own argument; torch.compile refuses mode together
    with options, so with options pass the mode inside them: options={"mode": "reduce-overhead", ...}."""
    from torch._inductor.compile_fx import compile_fx

    config, calibration = resolve(options)
    if mode is not None:
        config = config.replace(mode=mode)
    gm = transform(gm, example_inputs, config, calibration)
    return compile_fx(gm, example_inputs, config_patches=inductor_patches(config))


def eager_backend(options: Mapping | None = None):
    """A backend that rewrites but runs the graph eagerly (no Inductor): for debugging and tests."""
    config, calibration = resolve(options)

    def backend(gm, example_inputs):
        return transform(gm, example_inputs, config, calibration).forward

    return backend
