"""The `countdown` torch.compile backend: find the gated FFNs, rewrite them, hand the graph to Inductor.

    torch.compile(model, backend="countdown", options={"method": "m-countdown", "sparsity": 0.7})

`options` maps one-to-one onto CountDownConfig (plus "calibration": a Calibration or a path). The
backend is registered through the `torch_dynamo_backends` entry point, so the string works without
importing countdown_fx; `countdown_fx.backend.countdown_backend` is the same function.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from .config import CountDownConfig
from .kernels import ops
from .kernels.ops import COUNTDOWN_OPS
from .passes.match import match_sites, routed_experts
from .passes.rewrite import counters, keep_down_t_fresh, rewrite_sites

log = logging.getLogger(__name__)

NO_SITE_WARNING = (
    "countdown: no gated FFN (gate -> act -> * up -> down) was found in a graph Dynamo captured, so it runs "
    "unchanged (dense) through Inductor. If the model has graph breaks, its other graphs may still be "
    "sparsified: countdown_fx.find_sites(model, *inputs) lists what is found. Mixture-of-experts layers whose "
    "experts are routed per token (Mixtral, Qwen3-MoE) are not matched: only dense gated FFNs, a MoE's "
    "shared expert included."
)


# Config fields a calibration fixes: asking for another value next to it is a contradiction, not an override.
CALIBRATED_FIELDS = ("method", "sparsity", "threshold_rule", "predictor_rank")


def _stated(base: CountDownConfig | None) -> dict:
    """The fields a config's author passed (CountDownConfig.stated_fields), default-valued ones included; the
    fields the defaults filled in are not stated, so a calibration supplies them."""
    if base is None:
        return {}
    return {name: getattr(base, name) for name in base.stated_fields if name != "calibration"}


def resolve(options: Mapping[str, Any] | None) -> tuple[CountDownConfig, Any]:
    """(config, calibration) from backend options. A calibration supplies method, sparsity, apply_to and
    regime unless the options (or a `config` given in them) state them; stated values that contradict it are
    refused, and a stated `tau` shifts a D-CountDown calibration's logit threshold at every site. Options
    win over the fields of a `config`."""
    given = dict(options or {})
    base = given.pop("config", None)
    if base is not None and not isinstance(base, CountDownConfig):
        raise ValueError(f"option config must be a CountDownConfig, got {type(base).__name__}")
    calibration = given.get("calibration", base.calibration if base is not None else None)
    if calibration is None:
        return CountDownConfig.from_options({"config": base, **given} if base is not None else given), None
    if isinstance(calibration, (str, os.PathLike)):
        from .calibration import Calibration

        calibration = Calibration.load(calibration)
    if not hasattr(calibration, "config") or not hasattr(calibration, "state_for"):
        raise ValueError(
            f"option calibration must be a countdown_fx.Calibration or the path of a saved one, got "
            f"{type(calibration).__name__}; make one with countdown_fx.calibrate(model, batches, config)")
    cal_cfg = calibration.config
    stated = {**_stated(base), **{k: v for k, v in given.items() if k != "calibration"}}
    # each stated value valid on its own first ("M-CountDown", "0.5"), so the contradiction below names a real choice
    CountDownConfig.from_options({**{k: getattr(cal_cfg, k) for k in CALIBRATED_FIELDS}, **stated, "regime": "prac",
                                  "calibration": calibration})
    for key in CALIBRATED_FIELDS:
        if key in stated and stated[key] != getattr(cal_cfg, key):
            raise ValueError(
                f"option {key}={stated[key]!r} contradicts the calibration, which was made with "
                f"{key}={getattr(cal_cfg, key)!r}; calibrate again for {key}={stated[key]!r} or drop the option"
            )
    if stated.get("regime") == "ideal":
        raise ValueError("option regime='ideal' (an oracle top-k) uses no calibration, but one was given; drop "
                         "regime to run the calibration (regime 'prac'), or drop the calibration to run the oracle")
    if stated.get("tau") is not None and stated["tau"] != cal_cfg.tau:
        calibration = calibration.with_tau(stated["tau"])  # refuses methods other than d-countdown
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)} if base is not None else {}
    fields.update(given)
    fields.update({key: getattr(cal_cfg, key) for key in CALIBRATED_FIELDS})
    fields.update(calibration=calibration, tau=calibration.config.tau, regime="prac",
                  apply_to=stated.get("apply_to", cal_cfg.apply_to))
    return CountDownConfig.from_options(fields), calibration


def transform(gm: fx.GraphModule, example_inputs: Sequence | None, config: CountDownConfig,
              calibration=None, exported: bool = False, keep_grad: bool | None = None) -> fx.GraphModule:
    """The graph pass alone, in place: match + rewrite (no Inductor). Weights must be reachable: get_attr,
    call_module, or placeholders with `example_inputs`. Warns when there is nothing to rewrite.
    exported, keep_grad: see rewrite_sites."""
    sites = match_sites(gm, example_inputs)
    counters["sites_found"] += len(sites)
    experts = routed_experts(gm)
    if not sites:
        counters["graphs_without_sites"] += 1
        if experts:
            warnings.warn(
                f"countdown: {len(experts)} mixture-of-experts layer(s) of this graph (first: {experts[0]}) route "
                "tokens to experts (a grouped or batched matmul over stacked expert weights), which is not rewritten, "
                "and it has no dense gated FFN: it runs unchanged (dense).", stacklevel=2)
        elif has_countdown_ops(gm):
            warnings.warn("countdown: this graph already holds countdown ops (it was sparsified before: sparsify, "
                          "a saved exported program, a CountDownTransformation) and no other gated FFN, so it "
                          "runs as it is.", stacklevel=2)
        elif not sites.left_dense:  # those were each warned about, as left dense and why
            warnings.warn(NO_SITE_WARNING, stacklevel=2)
        return gm
    if experts:
        warnings.warn(
            f"countdown: {len(experts)} mixture-of-experts layer(s) of this graph (first: {experts[0]}) route tokens "
            "to experts through a grouped or batched matmul, which is not rewritten: those experts run dense. Only "
            f"the dense gated FFNs ({len(sites)} here, a MoE's shared expert included) run CountDown, and the "
            "sparsity that calibration and the meter report is theirs alone.", stacklevel=2)
    _warn_at_recompile_limit()
    return rewrite_sites(gm, sites, config, calibration, example_inputs, exported, keep_grad)


def _warn_at_recompile_limit() -> None:
    """Say it when Dynamo compiles a function for the last time it allows (torch._dynamo.config.recompile_limit):
    a later compile of it (another options dict, as in a sparsity sweep, or another shape) runs the function
    eagerly, that is dense, with only a line of Dynamo's log to say so."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if compile_id is None or not isinstance(limit, int) or compile_id.frame_compile_id != limit - 1:
        return
    warnings.warn(
        f"countdown: this is compile {limit} of this function, the last that Dynamo's recompile_limit ({limit}) "
        "allows: compiled again (with other options, or for another input shape), it will run eagerly, "
        "that is dense, with no countdown op and only a line of Dynamo's log to say so. Call "
        "torch._dynamo.reset() between settings of a sweep, or raise torch._dynamo.config.recompile_limit.",
        stacklevel=3)


def inductor_patches(config: CountDownConfig, dynamic: bool = False, rewritten: bool = False) -> dict:
    """Inductor config patches for a graph: the mode's, the kernels' (_kernel_compile_patches), Inductor's own
    PDL off where the graph holds countdown ops (inductor_pdl_patch), then the user's inductor_options, which
    win."""
    patches = dict(torch._inductor.list_mode_options(config.mode, dynamic)) if config.mode else {}
    patches.update(_kernel_compile_patches())
    if rewritten:
        patches.update(inductor_pdl_patch(config.inductor_options))
    patches.update(config.inductor_options)
    return patches


_inductor_pdl_warned = False


def inductor_pdl_patch(user_options: Mapping) -> dict:
    """Inductor's programmatic dependent launch for its own kernels (TORCHINDUCTOR_ENABLE_PDL=1) off in graphs
    with countdown ops. Its effect on them depends on the machine (Llama-3.1-8B shapes, batch 1, five H100s;
    benchmarks/results/speed_decode_e2e.md, sessions 19-20): -4.9% to -7.5% on three (D @0.9 230.9 -> 213.5 tokens/s,
    M @0.7 171.7 -> 161.9), +2% to +3% on the two where it also sped dense up by 2-6%; the loss sits in one of
    Inductor's own kernels, which it slows in dense graphs too. Off guards against the larger loss. Graphs without
    countdown ops keep it. Said once where the user had turned it on; the user's Inductor options (user_options:
    inductor_options here, inductor_configs in aoti.compile_and_package) keep it."""
    global _inductor_pdl_warned
    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        return {}
    if (torch._inductor.config.triton.enable_pdl and "triton.enable_pdl" not in user_options
            and not _inductor_pdl_warned):
        _inductor_pdl_warned = True
        warnings.warn("countdown: Inductor's programmatic dependent launch (TORCHINDUCTOR_ENABLE_PDL=1) is off in "
                      "graphs with countdown ops: on H100s it changed their decode speed by -7.5% to +3% by machine "
                      "(gains only where dense gained too). To keep it, pass inductor_options={'triton.enable_pdl': "
                      "True} (AOTInductor: inductor_configs), and time both on your machine.", stacklevel=3)
    return {"triton.enable_pdl": False}


def _kernel_compile_patches() -> dict:
    """What the kernels' launch options need from Inductor: with triton_ffn.CONFIG["pdl"], the kernels compiled in
    this process, where kernels/pdl_launch.py gives them the launch attribute (a compile worker would not), and no
    cached graph (its key does not hold the setting, so one compiled without PDL could be served)."""
    if ops.triton_ffn is None or not ops.triton_ffn.CONFIG["pdl"]:
        return {}
    return {"compile_threads": 1, "fx_graph_cache": False}


@dataclasses.dataclass
class _FileRead:
    real: str  # the file the path named when it was read (symlinks resolved, against the working directory then)
    stamp: tuple[int, int] | None  # its (mtime_ns, size) then
    calibration: Any  # what it held


# Calibration paths read by the backend in this process, as written in the options (what torch.compile compares).
_FILES_READ: dict[str, _FileRead] = {}


def _same_contents(a, b) -> bool:
    """Two Calibrations hold the same state and description (a file saved again with the same contents)."""
    described = [json.dumps([c.sites, c.stats], sort_keys=True, default=str) for c in (a, b)]  # NaN equals NaN there
    return (a.config == b.config and described[0] == described[1] and a.state.keys() == b.state.keys()
            and all(a.state[k].keys() == b.state[k].keys() and all(torch.equal(t, b.state[k][n])
                                                                    for n, t in a.state[k].items())
                    for k in a.state))


def _calibration_file_read_once(options: Mapping | None) -> Mapping | None:
    """options with a calibration path replaced by the Calibration read from it the first time. torch.compile
    reuses compiled graphs for equal options, and a path is equal to itself whatever the file holds now: every
    graph compiled for it must then run the same state, so the file is read once, and a path that now names other
    contents (the file rewritten, a symlink re-pointed, a relative path after a change of directory) is refused
    rather than mixed in (new shapes compiling the new contents next to graphs of the old)."""
    options = dict(options or {})
    path = options.get("calibration", getattr(options.get("config"), "calibration", None))  # a config's path too
    if not isinstance(path, (str, os.PathLike)):
        return options
    from .calibration import Calibration

    written = os.fspath(path)
    real = os.path.realpath(written)
    try:
        stat = os.stat(real)
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        stamp = None  # gone: the contents read before (if any) are what the compiled graphs run
    known = _FILES_READ.get(written)
    if known is None:
        _FILES_READ[written] = _FileRead(real, stamp, Calibration.load(path))
        return {**options, "calibration": _FILES_READ[written].calibration}
    same_file = real == known.real or stamp is None
    if same_file and stamp not in (None, known.stamp):  # touched: saved again, maybe with the same contents
        same_file = (known.stamp is not None and stamp[1] == known.stamp[1]
                     and _same_contents(Calibration.load(path), known.calibration))
        known.stamp = stamp if same_file else known.stamp
    if not same_file:
        now = "names another file" if real != known.real else "holds other contents"
        raise ValueError(
            f"calibration path {written!r} {now} than when this process first compiled with it ({known.real!r}). "
            "torch.compile reuses the graphs it compiled for equal options, and the same path is equal to itself, "
            "so graphs of the old contents would run next to graphs of the new. Save the new calibration under a "
            "new path, or pass options={'calibration': countdown_fx.Calibration.load(path)}: either compiles anew "
            "(a path is read once per process; torch._dynamo.reset() does not change that).")
    return {**options, "calibration": known.calibration}


def countdown_backend(gm: fx.GraphModule, example_inputs: Sequence, options: Mapping | None = None,
                      mode: str | None = None):
    """torch.compile backend. `mode` is torch.compile's own argument; torch.compile refuses mode together
    with options, so with options pass the mode inside them: options={"mode": "reduce-overhead", ...}."""
    from torch._inductor.compile_fx import compile_fx

    config, calibration = resolve(_calibration_file_read_once(options))
    if mode is not None:
        config = config.replace(mode=mode)
    gm = transform(gm, example_inputs, config, calibration)
    patches = inductor_patches(config, rewritten=has_countdown_ops(gm))
    return keep_down_t_fresh(gm, compile_fx(gm, example_inputs, config_patches=patches))


def has_countdown_ops(gm: fx.GraphModule) -> bool:
    """Whether the rewrite put a countdown op into the graph."""
    return any(node.target in COUNTDOWN_OPS for node in gm.graph.nodes)


def eager_backend(options: Mapping | None = None):
    """A backend that rewrites but runs the graph eagerly (no Inductor): for debugging and tests."""
    config, calibration = resolve(options)

    def backend(gm, example_inputs):
        gm = transform(gm, example_inputs, config, calibration)
        return keep_down_t_fresh(gm, gm.forward)

    return backend
