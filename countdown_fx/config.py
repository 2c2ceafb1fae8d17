"""CountDownConfig: every knob of the method, validated once, shared by the backend, passes and calibration."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

METHODS = ("cats", "m-countdown", "d-countdown")
REGIMES = ("ideal", "prac")
THRESHOLD_RULES = ("mean-kth", "quantile")
APPLY_TO = ("all", "decode")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Which score each method ranks neurons by (see kernels/reference.py).
METHOD_SCORE = {"cats": "gate", "m-countdown": "up", "d-countdown": "coef"}


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"CountDownConfig.{key}={value!r} is not allowed; choose one of {list(allowed)}")


def _refuse(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"CountDownConfig.{key}={value!r} is not allowed; it must be {allowed}")


def _integer(key: str, value: Any, allowed: str, minimum: int | None = None) -> int:
    """`value` as an int if it is an integer (not a bool: True is an int in Python) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        _refuse(key, value, allowed)
    return int(value)


def _number(key: str, value: Any, allowed: str, positive: bool = False) -> float:
    """`value` as a float if it is a finite real number (not a bool, NaN or inf), > 0 if `positive`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and not value > 0):
        _refuse(key, value, allowed)
    return float(value)


def _remembers_stated_fields(cls):
    """Wrap the dataclass __init__ so that each config knows which fields its author passed. A field passed at
    its default value (method="m-countdown") is a choice all the same: a calibration made otherwise must refuse
    it, not overrule it in silence. Kept out of the fields, so equality and hashing are unchanged."""
    generated = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(generated)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        generated(self, *args, **kwargs)
        object.__setattr__(self, "_stated_fields", frozenset(names[:len(args)]) | frozenset(kwargs))

    cls.__init__ = __init__
    return cls


@_remembers_stated_fields
@dataclass(frozen=True)
class CountDownConfig:
    """What to sparsify and how.

    method:     "cats" (score |act(g)|), "m-countdown" (score |u|), "d-countdown" (score |act(g) * u|).
    sparsity:   target fraction of FFN neurons skipped per token, in [0, 1).
    regime:     "ideal" (oracle per-token top-k, measures quality) or "prac" (calibrated threshold / predictor).
    apply_to:   "decode" (default: only steps with one token per sequence are sparse; prefill runs dense,
                as in the paper) or "all" tokens (prefill too; what quality evaluations of whole texts use).
    threshold_rule: how calibration turns scores into a per-site threshold ("mean-kth" as in the paper,
                "quantile" as in CATS).
    predictor_rank: rank r of the D-CountDown predictor; None picks min(512, what keeps it <= 5% of the FFN).
                Like tau, used by calibration and regime "prac" only (running "ideal" with it set warns).
    predictor_steps / predictor_lr / predictor_batch_tokens: D-CountDown predictor training (AdamW steps,
                peak learning rate, tokens per step).
    tau:        fixed predictor logit threshold; None lets calibration choose it per site to meet the sparsity.
    calibration: a Calibration or a path to a saved one; required by regime "prac".
    check_weights: refuse a calibration made on other weights than the model's (a sample of each site's
                weights is saved with it); False reuses one on purpose, e.g. a base model's on its fine-tune.
    dense_fallback: decode steps of so many tokens that their calibrated union is nearly full run the dense
                FFN (faster there, and their output is the dense model's; the calibration's decode plan says
                from which batch size). False keeps every step sparse: for measuring a method's quality on
                batched decode, as the paper measures it one token at a time.
    mode:       Inductor mode used after the rewrite (e.g. "reduce-overhead" for CUDA graphs).
    """

    method: str = "m-countdown"
    sparsity: float = 0.7
    regime: str = "ideal"
    apply_to: str = "decode"
    threshold_rule: str = "mean-kth"
    predictor_rank: int | None = None
    # the settings the committed quality results were measured with (benchmarks/results/quality_*.md)
    predictor_steps: int = 400
    predictor_lr: float = 2e-2
    predictor_batch_tokens: int = 512
    tau: float | None = None
    seed: int = 0
    calibration: Any = field(default=None, hash=False)
    check_weights: bool = True
    dense_fallback: bool = True
    mode: str | None = None
    inductor_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("regime", self.regime, REGIMES)
        _choice("apply_to", self.apply_to, APPLY_TO)
        _choice("threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        _choice("mode", self.mode, MODES)
        checked = {  # stored as plain int / float (a calibration saves them as JSON)
            "sparsity": _number("sparsity", self.sparsity, "a number in [0, 1) (the fraction of neurons skipped)"),
            "predictor_rank": None if self.predictor_rank is None else _integer(
                "predictor_rank", self.predictor_rank, "a positive int or None (automatic)", minimum=1),
            "predictor_steps": _integer("predictor_steps", self.predictor_steps,
                                        "a positive int (predictor AdamW steps)", minimum=1),
            "predictor_batch_tokens": _integer("predictor_batch_tokens", self.predictor_batch_tokens,
                                               "a positive int (tokens per predictor training step)", minimum=1),
            "predictor_lr": _number("predictor_lr", self.predictor_lr,
                                    "a positive finite number (peak learning rate, e.g. 2e-2)", positive=True),
            "tau": None if self.tau is None else _number(
                "tau", self.tau, "a finite number (predictor logit threshold) or None (calibrated)"),
            "seed": _integer("seed", self.seed, "an int (not a bool)"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"CountDownConfig.sparsity={self.sparsity!r} is out of range; it is the fraction of neurons "
                "skipped and must be in [0, 1) (e.g. 0.7)"
            )
        if self.tau is not None and self.method != "d-countdown":
            raise ValueError(
                f"CountDownConfig.tau applies to method 'd-countdown' only (got method={self.method!r}); "
                "CATS and M-CountDown use calibrated thresholds"
            )
        for key in ("check_weights", "dense_fallback"):
            if not isinstance(getattr(self, key), bool):
                _refuse(key, getattr(self, key), "True or False")
        if not isinstance(self.inductor_options, Mapping) or not all(isinstance(k, str) for k in self.inductor_options):
            _refuse("inductor_options", self.inductor_options, "a dict of Inductor config patches (str keys)")
        if self.predictor_rank is not None and self.method != "d-countdown":
            raise ValueError(
                f"CountDownConfig.predictor_rank applies to method 'd-countdown' only (got method={self.method!r})"
            )

    @property
    def score(self) -> str:
        """The neuron score this method ranks by: "gate", "up" or "coef"."""
        return METHOD_SCORE[self.method]

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "CountDownConfig":
        """Build from the backend's `options=` dict; unknown keys are refused, naming the allowed ones.
        This is the config a compile or sparsify() runs with (backend.resolve() ends here)."""
        options = dict(options or {})
        if isinstance(options.get("config"), CountDownConfig):
            base = options.pop("config")
            config = base.replace(**options) if options else base
        else:
            config = cls(**_checked_keys(options))
        config._warn_ignored_by_ideal()
        return config

    def _warn_ignored_by_ideal(self) -> None:
        """Regime "ideal" is an oracle top-k: it uses no predictor, so tau and predictor_rank do nothing there.
        Not refused in __post_init__: a config with the default regime "ideal" legitimately carries them into
        calibrate() (which makes a "prac" calibration) or, with calibration=..., into the backend (which turns
        it "prac"). Warned here, where a config without a calibration is about to run as "ideal"."""
        if self.regime != "ideal" or self.calibration is not None:
            return
        for key in ("tau", "predictor_rank"):
            if getattr(self, key) is not None:
                warnings.warn(
                    f"CountDownConfig.{key}={getattr(self, key)!r} is ignored: regime 'ideal' is an oracle top-k "
                    "and uses no predictor. To use it, calibrate with regime='prac' and pass the calibration "
                    "(options={'calibration': ...}).", UserWarning, stacklevel=3)

    @property
    def stated_fields(self) -> frozenset:
        """The names of the fields passed when this config was made (or changed by replace()), default-valued
        ones included: what its author chose, as against what the defaults filled in."""
        return getattr(self, "_stated_fields", frozenset())

    def replace(self, **changes: Any) -> "CountDownConfig":
        """A copy with `changes`; the fields stated are this config's and the changed ones (dataclasses.replace
        would count every field as stated)."""
        changed = dataclasses.replace(self, **_checked_keys(changes))
        object.__setattr__(changed, "_stated_fields", self.stated_fields | frozenset(changes))
        return changed


def _checked_keys(options: Mapping[str, Any]) -> dict:
    allowed = [f.name for f in dataclasses.fields(CountDownConfig)]
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown countdown option {key!r}; allowed options are {allowed}")
    return dict(options)
