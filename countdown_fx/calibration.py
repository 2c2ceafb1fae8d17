"""Calibration: what SP-Prac needs per site (thresholds, or predictors and tau), how it is made and kept.

    cal = calibrate(model, batches, CountDownConfig(method="m-countdown", sparsity=0.7, regime="prac"))
    print(cal.report())
    cal.save("m70.safetensors")
    torch.compile(model, backend="countdown", options={"calibration": "m70.safetensors"})

`calibrate` runs the model densely through the backend's graph path (passes.observe), so the state is
keyed by the same site keys the rewrite looks up. Passes over the data, each streaming (nothing but
reducers and predictor weights is kept between batches):

  1. fit      CATS / M-CountDown: per-site threshold by the config's rule (passes.thresholds).
  2. train    D-CountDown: predictors trained on (x, oracle mask) pairs, as many epochs as the steps need.
  3. tau      D-CountDown: per-site tau = the s-quantile of the predictor's logits (unless config.tau).
  4. measure  every method: realised sparsity and precision / recall against the |act(g) * u| oracle.

`calibrate_sweep` does the same for several configs at once, sharing the forward passes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .capture import refuse_compiled_forward
from .config import CountDownConfig
from .kernels import ops, reference
from .passes.observe import DYNAMO_AFTER_A_FAILED_CALL, ObserveSession, run_pass
from .passes.predictor import PredictorTrainer, default_rank, oracle_mask, predictor_fraction
from .passes.rewrite import stored_rank
from .passes.thresholds import MeanKth, SelectionCounts, StreamingQuantile, drop_count
from .passes import weights

log = logging.getLogger(__name__)

FORMAT = "countdown-fx/calibration"
FORMAT_VERSION = 1
METADATA_KEY = "countdown_fx"
# Fewer tokens than this per site is refused: a threshold or tau from a handful of tokens is noise.
MIN_CALIBRATION_TOKENS = 64
# The config fields a calibration depends on (saved with it); the rest are deployment choices.
SAVED_FIELDS = ("method", "sparsity", "apply_to", "threshold_rule", "predictor_rank", "predictor_steps",
                "predictor_lr", "predictor_batch_tokens", "tau", "seed")


def _checked_site(key: str, site: dict) -> dict:
    """A site's description from a file, its sizes integers (they index every tensor and kernel)."""
    for name in ("d_model", "d_inter"):
        if not isinstance(site[name], int) or isinstance(site[name], bool) or site[name] <= 0:
            raise ValueError(f"site {key!r} has {name}={site[name]!r}, not a positive integer")
    return site


def check_writable(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a path a calibration cannot be saved to, or would replace a file at without being asked to."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; give a file name such as "
                                f"{os.path.join(path, 'cal.safetensors')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path!r}: the folder {folder!r} does not exist; create it first")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it (`--force` on the command line), "
                              "or save under another name")


class Calibration:
    """Per-site SP-Prac state plus the config and statistics it came from.

    config: the CountDownConfig it was made for (regime "prac").
    sites:  key -> {"d_model", "d_inter", "dtype", "activation", "layout", "weight_sample"} of every
            calibrated site (weight_sample: passes.weights.sample of its weights, None where sharded).
    state:  key -> {"threshold": 0-dim fp32} (CATS, M-CountDown) or
            {"pred_v": [d_model, r], "pred_u": [d_inter, r], "tau": 0-dim fp32} (D-CountDown).
    stats:  key -> measured numbers (tokens, realised_sparsity, precision, recall, threshold / rank, ...).
    """

    def __init__(self, config: CountDownConfig, sites: Mapping[str, dict], state: Mapping[str, Mapping[str, torch.Tensor]],
                 stats: Mapping[str, dict] | None = None, meta: Mapping[str, Any] | None = None,
                 source: str | None = None):
        self.config = config.replace(regime="prac", calibration=None)
        self.sites = {k: dict(v) for k, v in sites.items()}
        self.state = {k: {n: t.detach().float().cpu() for n, t in v.items()} for k, v in state.items()}
        self.stats = {k: dict(v) for k, v in (stats or {}).items()}
        self.meta = dict(meta or {})
        self.source = source
        self._check_complete()

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def sparsity(self) -> float:
        return self.config.sparsity

    def _needed(self) -> tuple[str, ...]:
        return ("pred_v", "pred_u", "tau") if self.method == "d-countdown" else ("threshold",)

    def _check_complete(self) -> None:
        for key, info in self.sites.items():
            st = self.state.get(key, {})
            missing = [n for n in self._needed() if n not in st]
            if missing:
                raise ValueError(f"calibration{self._from()} lacks {missing} for site {key!r} (method {self.method})")
            for name in ("threshold", "tau"):
                if name in st and (st[name].dim() != 0 or torch.isnan(st[name])):
                    raise ValueError(f"calibration{self._from()}: {name} of site {key!r} must be a 0-dim number, "
                                     f"got {st[name]!r}")
            if "pred_v" in st:
                r = st["pred_v"].shape[-1]
                if tuple(st["pred_v"].shape) != (info["d_model"], r) or tuple(st["pred_u"].shape) != (info["d_inter"], r):
                    raise ValueError(
                        f"calibration{self._from()}: predictor of site {key!r} has V {tuple(st['pred_v'].shape)} and "
                        f"U {tuple(st['pred_u'].shape)}, not [d_model={info['d_model']}, r] and [d_inter={info['d_inter']}, r]")

    def _from(self) -> str:
        return f" {self.source!r}" if self.source else ""

    # -- what the rewrite asks ------------------------------------------------------------------------
    def resolve_keys(self, site_keys: Sequence[str]) -> dict[str, str]:
        """{graph site key: calibrated key} for the sites of one graph. A graph compiled from a part of the
        calibrated model (`model.model`) or from a wrapper around it names its sites relative to what was
        compiled, so the keys may differ by one module path added in front or removed, the same for every
        site of the graph. Refused: no such mapping, more than one (which part of the model this is would be
        a guess), or one that sends two sites to one calibrated key."""
        def relate(site_key: str, key: str):
            if key == site_key:
                return ("same", "")
            if key.endswith("." + site_key):
                return ("add", key[: -len(site_key) - 1])
            if site_key.endswith("." + key):
                return ("strip", site_key[: -len(key) - 1])
            return None

        relations = None
        for site_key in site_keys:
            found = {relate(site_key, k) for k in self.sites} - {None}
            relations = found if relations is None else relations & found
        relations = sorted(relations or ())
        if len(relations) == 1:
            how, prefix = relations[0]
            apply = {"same": lambda k: k, "add": lambda k: f"{prefix}.{k}", "strip": lambda k: k[len(prefix) + 1:]}[how]
            mapping = {k: apply(k) for k in site_keys}
            if len(set(mapping.values())) == len(mapping):
                return mapping
        first = next((k for k in site_keys if not any(relate(k, c) for c in self.sites)), None)
        if first is not None:
            alone = " (an FFN module compiled on its own has that key: compile the model you calibrated)"
            raise ValueError(
                f"calibration{self._from()} has no state for site {first!r}"
                f"{alone if first == '<root>' else ''}; it was made for {len(self.sites)} site(s): "
                f"{_preview(list(self.sites))}. Calibrate this model (countdown_fx.calibrate or `countdown-fx "
                "calibrate`) instead of reusing another model's file.")
        raise ValueError(
            f"the sites of the compiled graph ({_preview(list(site_keys))}) cannot be matched one to one with the "
            f"calibrated sites ({_preview(list(self.sites))}) by one module path added or removed in front: the "
            "compiled module's place in the calibrated model is not known (or could be more than one), as when "
            "a layer or an FFN is compiled on its own (which a graph break inside a decoder layer, or in the loop "
            "over layers, makes Dynamo do: TORCH_LOGS=graph_breaks names it), or when the file was made for a part "
            "of this model. Compile the module you calibrated (or one that holds it, or a part of it with its module "
            "path), without graph breaks inside its layers, with this calibration. " + DYNAMO_AFTER_A_FAILED_CALL)

    def check_sites(self, sites: Sequence, samples: Mapping[str, dict | None] | None = None) -> dict[str, str]:
        """{site key: calibrated key} for the sites of one graph (resolve_keys). Raises ValueError naming the
        first site of `sites` this calibration has no state for, or whose sizes or activation differ from the
        calibrated ones, and, given `samples` ({site key: passes.weights sample of its weights now}), when the
        weights differ from those it was calibrated on. Calibrated sites absent from `sites` are fine (a graph
        break splits a model's sites over several graphs)."""
        resolved = self.resolve_keys([site.key for site in sites])
        for site in sites:
            key = resolved[site.key]
            info = self.sites[key]
            named = f"site {site.key!r}" + (f" (calibrated as {key!r})" if key != site.key else "")
            if (info["d_model"], info["d_inter"]) != (site.d_model, site.d_inter):
                raise ValueError(
                    f"calibration{self._from()} does not fit {named}: calibrated for d_model="
                    f"{info['d_model']}, d_inter={info['d_inter']}, but the model has d_model={site.d_model}, "
                    f"d_inter={site.d_inter}")
            if info.get("activation") and info["activation"] != site.activation:
                raise ValueError(
                    f"calibration{self._from()} does not fit {named}: calibrated with activation "
                    f"{info['activation']!r}, but the model's FFN uses {site.activation!r}; thresholds of one "
                    "activation's scores mean nothing for another. Calibrate this model.")
            if info.get("dtype") and info["dtype"] != str(site.dtype).replace("torch.", ""):
                log.info("countdown: site %s calibrated in %s, runs in %s", site.key, info["dtype"], site.dtype)
        if samples is not None:  # after the sizes: a file for other sizes is refused for that, not for its values
            self._check_weights(resolved, samples)
        return resolved

    def _check_weights(self, resolved: Mapping[str, str], samples: Mapping[str, dict | None]) -> None:
        """Refuse a model whose weights are not the calibrated model's (passes.weights says why this matters).
        samples: {site key: its sample, or None where its weights cannot be read here (fake or meta tensors)};
        sites left out of it (sharded) and files saved before samples are not compared. Unreadable weights
        against a stored sample get one warning: the check could not run."""
        other, unread = [], []
        for site_key, key in resolved.items():
            stored = self.sites[key].get("weight_sample")
            if not stored or site_key not in samples:
                continue
            now = samples[site_key]
            if now is None:
                unread.append(site_key)
            else:
                n_differing = weights.differing(stored, now)
                if not weights.few_enough(n_differing, stored):
                    other.append((site_key, n_differing, len(stored["values"])))
        if unread and not other:
            warnings.warn(
                f"countdown: the weights of {len(unread)} site(s) (first: {unread[0]!r}) are not readable here (fake "
                "or meta tensors, or graph inputs without example values: pass example_inputs to sparsify), so "
                f"calibration{self._from()} could not be checked against them; make sure it was made on this model.",
                stacklevel=4)
        if other:
            site_key, n, total = other[0]
            raise ValueError(
                f"calibration{self._from()} was made on other weights than this model's: at {len(other)} of "
                f"{len(resolved)} site(s) (first: {site_key!r}, {n} of {total} sampled values of W_gate, W_up and "
                "W_down differ). Its thresholds and predictors fit the weights they were calibrated on; here they "
                "would miss the target sparsity and quality without saying so. Calibrate this model "
                "(countdown_fx.calibrate or `countdown-fx calibrate`); to reuse the file on purpose (a base model's "
                "calibration on its fine-tune, say), pass options={'check_weights': False} and measure what it "
                "reaches with countdown_fx.SparsityMeter.")

    def state_for(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors the rewrite registers as buffers for calibrated site `key` (fresh copies, fp32)."""
        if key not in self.state:
            raise ValueError(f"calibration{self._from()} has no state for site {key!r}")
        return {name: self.state[key][name].clone() for name in self._needed()}

    def with_tau(self, tau: float) -> "Calibration":
        """A copy whose D-CountDown predictors keep logit > `tau` at every site (a deploy-time shift of the
        speed / quality trade-off; the realised sparsity then differs from the calibrated target)."""
        if self.method != "d-countdown":
            raise ValueError(f"tau applies to d-countdown calibrations; this one is {self.method}")
        if not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number, got {tau!r}")
        state = {k: {**v, "tau": torch.tensor(float(tau), dtype=torch.float32)} for k, v in self.state.items()}
        stats = {k: {**v, "tau": float(tau)} for k, v in self.stats.items()}  # measured numbers no longer apply
        for v in stats.values():
            for name in ("realised_sparsity", "deployed_sparsity", "precision", "recall", "union_by_batch",
                         "measured_on_held_out"):
                v.pop(name, None)
        return Calibration(self.config.replace(tau=float(tau)), self.sites, state, stats, self.meta, self.source)

    # -- files --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """One safetensors file: tensors "<site key>::<name>", everything else as JSON metadata. An existing file
        is replaced only with overwrite=True (it may be another calibration, or no calibration at all)."""
        from safetensors.torch import save_file

        check_writable(path, overwrite)
        tensors = {f"{key}::{name}": t.contiguous() for key, st in self.state.items() for name, t in st.items()}
        header = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION, **_versions(),
                  "config": {f: getattr(self.config, f) for f in SAVED_FIELDS},
                  "sites": self.sites, "stats": self.stats}
        save_file(tensors, os.fspath(path), metadata={METADATA_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Read a file written by `save`; refuses files of another format or a newer format version."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {name: f.get_tensor(name) for name in f.keys()} if raw is not None else {}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types, without the path
            raise ValueError(f"calibration file {path!r} cannot be read as a safetensors file ({err}): it is "
                             "truncated, corrupt or of another format; save the calibration again "
                             "(Calibration.save or `countdown-fx calibrate`)") from err
        if raw is None:
            raise ValueError(f"{path!r} is a safetensors file but not a countdown-fx calibration (no "
                             f"{METADATA_KEY!r} metadata)")
        try:
            header = json.loads(raw)
            version = header.get("format_version", 0) if isinstance(header, dict) else None
            if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(version, int):
                raise ValueError(f"format {header.get('format') if isinstance(header, dict) else None!r}")
        except ValueError as err:
            raise ValueError(f"{path!r} is a safetensors file but its {METADATA_KEY!r} metadata is not a countdown-fx "
                             f"calibration's ({err}); save the calibration again") from err
        if version > FORMAT_VERSION:
            raise ValueError(f"{path!r} has format {FORMAT!r} version {version}; this countdown-fx reads it up to "
                             f"version {FORMAT_VERSION}: upgrade countdown-fx")
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            key, _, field = name.rpartition("::")
            state.setdefault(key, {})[field] = t
        try:
            config = CountDownConfig(**{**header["config"], "regime": "prac"})
            sites = {k: _checked_site(k, v) for k, v in header["sites"].items()}
            meta = {k: v for k, v in header.items() if k not in ("config", "sites", "stats")}
            return cls(config, sites, state, header.get("stats"), meta, source=path)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"calibration file {path!r} does not hold a consistent calibration ({type(err).__name__}: "
                             f"{err}); it was edited or written by something else: save the calibration again") from err

    # -- reading ------------------------------------------------------------------------------------
    def overall_sparsity(self, stat: str = "realised_sparsity") -> float:
        """A sparsity stat over all sites, weighted by tokens x d_inter: "realised_sparsity" (the fit, on the
        calibration data) or "deployed_sparsity" (every layer sparse, on the last fifth of it)."""
        num = den = 0.0
        for key, st in self.stats.items():
            if stat in st and not math.isnan(st[stat]):
                w = st.get("tokens", 1) * self.sites[key]["d_inter"]
                num += st[stat] * w
                den += w
        return num / den if den else float("nan")

    def report(self) -> str:
        """A readable per-site table: state, realised sparsity and precision / recall vs the oracle."""
        cfg = self.config
        d = cfg.method == "d-countdown"
        head = [f"CountDown calibration: method={cfg.method} sparsity={cfg.sparsity:g} "
                + (f"rank={cfg.predictor_rank or 'auto'} tau={'calibrated' if cfg.tau is None else cfg.tau}" if d
                   else f"rule={cfg.threshold_rule}")
                + f", {len(self.sites)} site(s)" + (f", file {self.source}" if self.source else "")]
        cols = (["site", "d_model", "d_inter", "rank", "pred/FFN", "tau"] if d else
                ["site", "d_model", "d_inter", "threshold"]) + ["tokens", "realised_s", "deployed_s", "precision", "recall"]
        rows = []
        for key, info in self.sites.items():
            st = self.stats.get(key, {})
            row = [key, info["d_model"], info["d_inter"]]
            if d:
                r = self.state[key]["pred_v"].shape[-1]
                # the bytes it adds as deployed: the rewrite stores it with its rank padded (rewrite.stored_rank)
                row += [r, f"{predictor_fraction(stored_rank(r), info['d_model'], info['d_inter']):.1%}",
                        f"{float(self.state[key]['tau']):.4g}"]
            else:
                row.append(f"{float(self.state[key]['threshold']):.4g}")
            row += [st.get("tokens", "-"), _pct(st.get("realised_sparsity")), _pct(st.get("deployed_sparsity")),
                    _pct(st.get("precision")), _pct(st.get("recall"))]
            rows.append([str(c) for c in row])
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
        lines = head + [fmt(cols), "-" * len(fmt(cols))] + [fmt(r) for r in rows]
        if d and cfg.tau is not None and not any("realised_sparsity" in st for st in self.stats.values()):
            lines.append(f"tau set to {cfg.tau:g} after calibration (with_tau, or the tau option): nothing was "
                         f"measured at it, so the sparsity it reaches is unknown (the target {cfg.sparsity:.1%} was "
                         "the calibrated tau's); measure it with countdown_fx.meter.")
            return "\n".join([*lines, self._plan_summary()])
        held_out = any(st.get("measured_on_held_out") for st in self.stats.values())
        lines.append(f"overall realised sparsity {_pct(self.overall_sparsity())} (target {cfg.sparsity:.1%}); "
                     "precision / recall: kept neurons vs the per-token top-(1-s) of |act(g)*u|, on "
                     + ("held-out calibration batches (not used to train the predictor)" if held_out
                        else "calibration data"))
        lines.append("realised_s is the fit, not the deployment: measured on the tokens the "
                     + ("tau" if d else "thresholds") + " were chosen on, with every layer fed its dense input. "
                     "deployed_s runs every layer sparse, as deployed, on the last fifth of the calibration batches "
                     f"(overall {_pct(self.overall_sparsity('deployed_sparsity'))}): later layers see what the "
                     "earlier sparse ones give them. On new text it drifts again: measure yours with "
                     "countdown_fx.meter")
        union = self.union_by_batch()
        if union:
            lines.append("neurons a decode step of B tokens reads (union of their masks, random calibration tokens): "
                         + ", ".join(f"B={b} {_pct(u)}" for b, u in union.items())
                         + "; sparse kernels pay off while this stays well below 100%")
        lines.append(self._plan_summary())
        return "\n".join(lines)

    def site_union_by_batch(self, key: str) -> dict[int, float]:
        """Expected fraction of site `key`'s neurons a decode step of B tokens reads: B = 1 (1 - realised
        sparsity) and the batch sizes calibration measured; empty when nothing was measured (with_tau)."""
        st = self.stats.get(key, {})
        per_batch = {int(b): u for b, u in st.get("union_by_batch", {}).items()}
        if "realised_sparsity" in st and not math.isnan(st["realised_sparsity"]):
            per_batch[1] = 1.0 - st["realised_sparsity"]
        return dict(sorted(per_batch.items()))

    def union_by_batch(self) -> dict[int, float]:
        """site_union_by_batch over all sites, weighted by d_inter."""
        num, den = {}, {}
        for key in self.stats:
            d_inter = self.sites[key]["d_inter"]
            for b, u in self.site_union_by_batch(key).items():
                num[b] = num.get(b, 0.0) + u * d_inter
                den[b] = den.get(b, 0) + d_inter
        return {b: num[b] / den[b] for b in sorted(num)}

    def decode_plan(self, key: str) -> ops.DecodePlan:
        """How the op of calibrated site `key` runs decode steps of each batch size (gather side, or the dense
        FFN at nearly full unions), from the union measured at calibration."""
        return ops.decode_plan(ops.op_kind(self.method), self.site_union_by_batch(key))

    def _plan_summary(self) -> str:
        plans = [self.decode_plan(key) for key in self.sites]
        parts = []
        gather = sorted({p.gather_max_tokens for p in plans if p.gather_max_tokens})
        if gather:
            parts.append(f"{sum(p.gather_max_tokens > 0 for p in plans)} of {len(plans)} site(s) read gate/up "
                         f"through the gather kernel in steps of up to {'/'.join(map(str, gather))} tokens")
        dense = sorted({p.dense_min_tokens for p in plans if p.dense_min_tokens})
        if dense:
            parts.append(f"{sum(p.dense_min_tokens > 0 for p in plans)} of {len(plans)} site(s) run the DENSE FFN "
                         f"(no sparsity) in steps of at least {'/'.join(map(str, dense))} tokens, "
                         "where their union is so full that sparse decode would be slower")
        return "decode plan: " + ("; ".join(parts) if parts else "sparse kernels (masked side) at every batch size")

    def __repr__(self) -> str:
        return (f"Calibration(method={self.method!r}, sparsity={self.sparsity}, sites={len(self.sites)}, "
                f"realised={self.overall_sparsity():.3f})")


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"


def _preview(keys: list[str], n: int = 4) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _versions() -> dict:
    from . import __version__

    return {"library_version": __version__, "torch_version": torch.__version__}


# ------------------------------------------------------------------------------------------------------
# Making one.


def calibrate(model: nn.Module, batches, config: CountDownConfig, *, progress: bool = True) -> Calibration:
    """Calibrate `model` for `config` (any method) on `batches`; see the module docstring for the passes.

    batches: a LongTensor of input_ids [batch, seq], a dict of model kwargs, or an iterable of either
    (an iterator is read once into a list, since calibration makes several passes). Padding marked 0 in
    an `attention_mask` of the same [batch, seq] shape is left out of the statistics.
    Raises ValueError on empty or too-short data (< MIN_CALIBRATION_TOKENS tokens per site) and on
    non-finite activations, naming the site.

    Whole sequences serve apply_to="decode" too: in a causal LM the FFN input of a decode step is the same
    vector as that position's in a full dense forward pass, so every position is a decode-token sample.
    """
    return calibrate_sweep(model, batches, [config], progress=progress)[0]


def calibrate_sweep(model: nn.Module, batches, configs: Sequence[CountDownConfig], *,
                    progress: bool = True) -> list[Calibration]:
    """Calibrations for several configs (methods, sparsities) from shared forward passes, in order."""
    configs = list(configs)
    if not configs:
        raise ValueError("calibrate_sweep needs at least one config")
    for config in configs:
        if not isinstance(config, CountDownConfig):
            raise TypeError(f"calibration needs a countdown_fx.CountDownConfig, got {type(config).__name__}: "
                            "CountDownConfig(method='m-countdown', sparsity=0.7, regime='prac')")
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate takes the nn.Module to calibrate, got {type(model).__name__}")
    refuse_compiled_forward(model)
    on_meta = next((name for name, t in model.state_dict().items() if t.is_meta), None)
    if on_meta is not None:
        raise ValueError(f"the model's weights are on the meta device ({on_meta!r} first): they hold no values to "
                         "calibrate on; load the real weights (from_pretrained, load_state_dict(..., assign=True))")
    batches = _batch_list(batches, _device_of(model))
    _check_token_ids(model, batches)
    was_training = model.training
    model.eval()
    try:
        return _Sweep(model, batches, configs, progress).run()
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _batch_list(batches, device) -> list:
    if batches is None:
        raise TypeError("calibration got batches=None: pass input_ids tensors [batch, seq] or dicts of model kwargs")
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    out = []
    for b in batches:
        if isinstance(b, torch.Tensor):
            out.append((b.unsqueeze(0) if b.dim() == 1 else b).to(device))
        elif isinstance(b, Mapping):
            out.append({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        else:
            raise TypeError(f"calibration batches must be LongTensors of input_ids or dicts of model kwargs, "
                            f"got {type(b).__name__}")
    if not out:
        raise ValueError("calibration got no batches: pass at least one batch of input_ids "
                         f"(>= {MIN_CALIBRATION_TOKENS} tokens; thousands are better)")
    return out


def embedding_rows(model: nn.Module) -> int | None:
    """How many token ids the model's input embedding (Hugging Face get_input_embeddings) can look up, or None
    where it has no nn.Embedding to ask."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def _check_token_ids(model: nn.Module, batches: list) -> None:
    """Batches a model with a token embedding cannot take, refused here rather than deep inside Dynamo: ids that
    are not an integer [batch, seq] tensor, or that its embedding cannot look up; a dict without input_ids or
    inputs_embeds (a misspelt key would fail inside the model, and a failed first call can leave Dynamo's cache
    for the model's code in a state that later calibrations trip over)."""
    rows = embedding_rows(model)
    if rows is None:
        return
    for i, b in enumerate(batches):
        if isinstance(b, Mapping):
            if "input_ids" not in b and "inputs_embeds" not in b:
                raise ValueError(f"calibration batch {i} has no 'input_ids' (nor 'inputs_embeds'); its keys are "
                                 f"{sorted(b)}")
            b = b.get("input_ids")
        if not isinstance(b, torch.Tensor):
            continue
        if b.is_floating_point() or b.is_complex() or b.dtype == torch.bool or b.dim() != 2:
            raise ValueError(f"calibration batch {i}: input_ids must be an integer tensor [batch, seq] (or [seq]), "
                             f"got {b.dtype} of shape {tuple(b.shape)}")
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= rows):
            raise ValueError(f"calibration batch {i}: token ids from {int(b.min())} to {int(b.max())}, but the "
                             f"model's embedding has {rows} rows (ids 0 to {rows - 1}): were they made by this "
                             "model's tokenizer?")


def _token_count(batches) -> int | None:
    """Tokens in batches of input_ids (or kwargs with an attention_mask, padding not counted); None where
    the batches do not say (other model inputs)."""
    total = 0
    for b in batches:
        if isinstance(b, torch.Tensor) and not b.is_floating_point():
            total += b.numel()
        elif isinstance(b, Mapping) and isinstance(b.get("input_ids"), torch.Tensor):
            ids, mask = b["input_ids"], b.get("attention_mask")
            # a [batch, seq] padding mask, as the observer reads it; any other mask form counts every id
            fits = isinstance(mask, torch.Tensor) and mask.shape == ids.shape
            total += int(mask.bool().sum()) if fits else ids.numel()
        else:
            return None
    return total


def _held_out_count(n_batches: int) -> int:
    """How many of the last batches D-CountDown holds out for tau and the report, and the deployed-sparsity pass
    runs on: a fifth, at least one."""
    return max(1, n_batches // 5)


def _check_finite(key: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"non-finite values (NaN or inf) in {name} at site {key!r} during calibration; no threshold or "
                "predictor is derived from them. Check the model's dtype (fp16 overflow?) and its inputs.")


class _Sweep:
    """The passes of calibrate_sweep; per-config, per-site reducers live in dicts keyed [config index][site]."""

    def __init__(self, model, batches, configs, progress):
        self.session = ObserveSession(model)
        self.batches, self.configs, self.progress = batches, configs, progress
        self.tokens: dict[str, int] = {}
        self.thresholds = [dict() for _ in configs]
        self.trainers = [dict() for _ in configs]
        self.taus = [dict() for _ in configs]
        self.counts = [dict() for _ in configs]
        self.passes = 0
        self.pass_tokens: dict[str, int] = {}  # tokens per site seen by the latest pass
        # D-CountDown: the predictor learns on the first batches; tau and every reported number come from
        # held-out batches, which the predictor has not seen (in-sample logits overstate the sparsity a
        # trained predictor reaches on new text, by a lot when calibration data is small).
        self.train_batches, self.measure_batches = batches, batches
        if any(c.method == "d-countdown" for c in configs):
            if len(batches) >= 2:
                held_out = _held_out_count(len(batches))
                self.train_batches, self.measure_batches = batches[:-held_out], batches[-held_out:]
                tokens = _token_count(self.measure_batches)
                if tokens is not None and tokens < MIN_CALIBRATION_TOKENS:  # refuse before training, not after
                    raise ValueError(
                        f"calibration data too short: the held-out batches (the last {held_out} of {len(batches)}, "
                        f"where D-CountDown chooses tau and measures its predictor) hold {tokens} token(s), fewer "
                        f"than the {MIN_CALIBRATION_TOKENS} needed; pass more or longer batches")
            else:
                warnings.warn(
                    "countdown: D-CountDown calibration got one batch, so tau and the reported sparsity come "
                    "from the tokens its predictor was trained on and overstate what it reaches on new text; "
                    "pass at least 2 batches (the last max(1, n // 5) are held out).", stacklevel=3)

    # one pass over the data; the first pass of any kind also counts tokens and checks them
    def _pass(self, callback, desc: str, batches=None, selector=None) -> None:
        first = self.passes == 0
        batches = self.batches if batches is None else batches
        self.pass_tokens = {}

        def cb(key, x, act_g, u):
            _check_finite(key, x=x, act_g=act_g, u=u)
            if first:
                self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]
            self.pass_tokens[key] = self.pass_tokens.get(key, 0) + x.shape[0]
            callback(key, x, act_g, u)

        run_pass(self.session, batches, cb, desc, self.progress, total=len(batches), selector=selector)
        self.passes += 1
        if first:
            self._check_tokens(self.tokens, "")

    @staticmethod
    def _check_tokens(tokens: dict[str, int], which_data: str) -> None:
        """Refuse a pass that gave some site too few tokens for a meaningful threshold / tau."""
        for key, n in tokens.items():
            if n < MIN_CALIBRATION_TOKENS:
                raise ValueError(
                    f"calibration data too short: {which_data}site {key!r} saw {n} token(s), fewer than the "
                    f"{MIN_CALIBRATION_TOKENS} needed for a meaningful threshold; use thousands of tokens")

    def _sites(self):
        return self.session.sites

    def run(self) -> list[Calibration]:
        idx = list(range(len(self.configs)))
        thr = [i for i in idx if self.configs[i].method != "d-countdown"]
        pred = [i for i in idx if self.configs[i].method == "d-countdown"]
        if thr:
            self._fit(thr)
        if pred:
            self._train(pred)
            if any(self.configs[i].tau is None for i in pred):
                self._fit_tau([i for i in pred if self.configs[i].tau is None])
        self._measure(idx)
        self._measure_deployed(idx)
        return [self._result(i) for i in idx]

    def _fit(self, which: list[int]) -> None:
        reducers = {i: {} for i in which}

        def cb(key, x, act_g, u):
            d_inter = act_g.shape[-1]
            for i in which:
                cfg = self.configs[i]
                r = reducers[i].get(key)
                if r is None:
                    r = reducers[i][key] = (MeanKth(d_inter, cfg.sparsity) if cfg.threshold_rule == "mean-kth"
                                            else StreamingQuantile(x.device))
                r.update(reference.score(cfg.score, act_g, u))

        self._pass(cb, "calibrate: fit thresholds")
        for i in which:
            cfg = self.configs[i]
            for key, r in reducers[i].items():
                if isinstance(r, MeanKth):
                    self.thresholds[i][key] = r.value()
                elif drop_count(self._sites()[key]["d_inter"], cfg.sparsity) == 0:
                    self.thresholds[i][key] = -math.inf
                else:
                    self.thresholds[i][key] = r.quantile(cfg.sparsity)

    def _train(self, which: list[int]) -> None:
        def cb(key, x, act_g, u):
            masks = {}
            for i in which:
                cfg = self.configs[i]
                t = self.trainers[i].get(key)
                if t is None:
                    d_model, d_inter = x.shape[-1], act_g.shape[-1]
                    t = self.trainers[i][key] = PredictorTrainer(
                        key, d_model, d_inter, cfg.predictor_rank or default_rank(d_model, d_inter),
                        steps=cfg.predictor_steps, lr=cfg.predictor_lr, batch_tokens=cfg.predictor_batch_tokens,
                        seed=cfg.seed, device=x.device)
                if not t.done:
                    if cfg.sparsity not in masks:
                        masks[cfg.sparsity] = oracle_mask(act_g, u, cfg.sparsity)
                    t.feed(x, masks[cfg.sparsity])

        epoch = 0
        limit = None
        while True:
            self._pass(cb, f"calibrate: train predictors (epoch {epoch + 1})", self.train_batches)
            epoch += 1
            trainers = [t for i in which for t in self.trainers[i].values()]
            if all(t.done for t in trainers):
                break
            if limit is None:  # after one epoch we know how many tokens an epoch gives
                per_epoch = min(self.pass_tokens.values())
                need = max(self.configs[i].predictor_steps * self.configs[i].predictor_batch_tokens for i in which)
                limit = math.ceil(need / per_epoch) + 1
                if limit > 20:
                    warnings.warn(
                        f"countdown: predictor training needs {need} tokens per site but the training batches have "
                        f"{per_epoch}; it will take {limit - 1} epochs over the same tokens (risk of overfitting, "
                        "and slow). Give more calibration data or fewer predictor_steps.", stacklevel=3)
            if epoch >= limit:
                raise RuntimeError(f"countdown: predictor training did not finish in {epoch} epochs (internal error)")

    def _fit_tau(self, which: list[int]) -> None:
        def cb(key, x, act_g, u):
            for i in which:
                t = self.trainers[i][key]
                q = self.taus[i].get(key)
                if q is None:
                    q = self.taus[i][key] = StreamingQuantile(x.device)
                with torch.no_grad():
                    q.update(reference.predictor_logits(x, t.pred_v, t.pred_u))

        self._pass(cb, "calibrate: choose tau (held-out batches)", self.measure_batches)

    def _tau(self, i: int, key: str) -> float:
        cfg = self.configs[i]
        if cfg.tau is not None:
            return float(cfg.tau)
        if drop_count(self._sites()[key]["d_inter"], cfg.sparsity) == 0:
            return -math.inf
        return self.taus[i][key].quantile(cfg.sparsity)

    def _held_out(self, i: int) -> bool:
        """Config i is measured on held-out batches: D-CountDown, when there were batches to hold out."""
        return self.configs[i].method == "d-countdown" and self.measure_batches is not self.batches

    def _measure(self, which: list[int]) -> None:
        """CATS / M-CountDown on all batches, D-CountDown on the held-out ones (two passes when mixed)."""
        self._taus = {(i, key): self._tau(i, key) for i in which if self.configs[i].method == "d-countdown"
                      for key in self.trainers[i]}
        held_out = [i for i in which if self._held_out(i)]
        rest = [i for i in which if not self._held_out(i)]
        if rest:
            self._measure_on(rest, self.batches, "calibrate: measure")
        if held_out:
            self._measure_on(held_out, self.measure_batches, "calibrate: measure (held-out batches)")
            self._check_tokens(self.pass_tokens, f"in the held-out batches (the last {len(self.measure_batches)} "
                               f"of {len(self.batches)}, where D-CountDown chooses tau and measures its predictor) ")

    def _kept(self, i: int, key: str, x, act_g, u) -> torch.Tensor:
        """The neurons config i's finished state keeps for these tokens (bool [N, d_inter])."""
        cfg = self.configs[i]
        if cfg.method == "d-countdown":
            t = self.trainers[i][key]
            with torch.no_grad():
                return reference.predictor_logits(x, t.pred_v, t.pred_u) > self._taus[(i, key)]
        return reference.score(cfg.score, act_g, u).float() > self.thresholds[i][key]

    def _measure_deployed(self, which: list[int]) -> None:
        """Per config, one pass over the last fifth of the batches with every site sparse by its new state, as
        deployed: later layers then see what the earlier sparse ones give them, which the fit (dense inputs at
        every layer) does not show. Records deployed_sparsity per site."""
        batches = self.batches[-_held_out_count(len(self.batches)):]
        self.deployed = [dict() for _ in self.configs]
        for i in which:
            def select(key, x, act_g, u, real, i=i):
                """The sparse FFN's keep mask for all tokens; counted over the real ones."""
                kept = self._kept(i, key, x, act_g, u)
                counted = kept if real is None else kept[real]
                n_kept, n_tokens = self.deployed[i].get(key, (0, 0))
                self.deployed[i][key] = (n_kept + int(counted.sum()), n_tokens + counted.shape[0])
                return kept

            self._pass(lambda *site: None, f"calibrate: measure as deployed ({self.configs[i].method} "
                       f"s={self.configs[i].sparsity:g})", batches, selector=select)

    def _measure_on(self, which: list[int], batches, desc: str) -> None:
        def cb(key, x, act_g, u):
            oracles = {}
            for i in which:
                cfg = self.configs[i]
                kept = self._kept(i, key, x, act_g, u)
                if cfg.sparsity not in oracles:
                    oracles[cfg.sparsity] = oracle_mask(act_g, u, cfg.sparsity)
                self.counts[i].setdefault(key, SelectionCounts()).update(kept, oracles[cfg.sparsity])

        self._pass(cb, desc, batches)

    def _result(self, i: int) -> Calibration:
        cfg = self.configs[i]
        state, stats = {}, {}
        for key, info in self._sites().items():
            st = dict(self.counts[i][key].summary())
            if cfg.method == "d-countdown":
                t = self.trainers[i][key]
                tau = self._taus[(i, key)]
                state[key] = {**t.state(), "tau": torch.tensor(tau, dtype=torch.float32)}
                # the bytes it adds as deployed: stored with its rank padded to a multiple of 16 (zero columns)
                deployed = predictor_fraction(stored_rank(t.rank), info["d_model"], info["d_inter"])
                st.update(rank=t.rank, stored_rank=stored_rank(t.rank), predictor_fraction=deployed,
                          tau=tau, steps=t.step_count, final_loss=sum(t.losses[-10:]) / max(1, len(t.losses[-10:])))
            else:
                thr = self.thresholds[i][key]
                state[key] = {"threshold": torch.tensor(thr, dtype=torch.float32)}
                st["threshold"] = thr
            st["measured_on_held_out"] = self._held_out(i)
            kept, tokens = self.deployed[i].get(key, (0, 0))
            if tokens:
                st["deployed_sparsity"] = 1.0 - kept / (tokens * info["d_inter"])
            stats[key] = st
        return Calibration(cfg, self._sites(), state, stats)
