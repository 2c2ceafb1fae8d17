"""CountDownConfig: every knob of the method, validated once, shared by the backend, passes and calibration."""

from __future__ import annotations

import dataclasses
import math
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
    predictor_steps / predictor_lr / predictor_batch_tokens: D-CountDown predictor training (AdamW steps,
                peak learning rate, tokens per step).
    tau:        fixed predictor logit threshold; None lets calibration choose it per site to meet the sparsity.
    calibration: a Calibration or a path to a saved one; required by regime "prac".
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
    mode: str | None = None
    inductor_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("regime", self.regime, REGIMES)
        _choice("apply_to", self.apply_to, APPLY_TO)
        _choice("threshold_rule", self.threshold_rule, THRESHOLD_RULES)
        _choice("mode", self.mode, MODES)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"CountDownConfig.sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not (0.0 <= float(self.sparsity) < 1.0) or math.isnan(self.sparsity):
            raise ValueError(
                f"CountDownConfig.sparsity={self.sparsity!r} is out of range; it is the fraction of neurons "
                "skipped and must be in [0, 1) (e.g. 0.7)"
            )
        object.__setattr__(self, "sparsity", float(self.sparsity))
        if self.predictor_rank is not None and (not isinstance(self.predictor_rank, int) or self.predictor_rank < 1):
            raise ValueError(
                f"CountDownConfig.predictor_rank={self.predictor_rank!r} must be a positive int or None (automatic)"
            )
        if not isinstance(self.predictor_steps, int) or self.predictor_steps < 1:
            raise ValueError(f"CountDownConfig.predictor_steps={self.predictor_steps!r} must be a positive int")
        if isinstance(self.predictor_batch_tokens, bool) or not isinstance(self.predictor_batch_tokens, int) \
                or self.predictor_batch_tokens < 1:
            raise ValueError(
                f"CountDownConfig.predictor_batch_tokens={self.predictor_batch_tokens!r} must be a positive int "
                "(tokens per predictor training step)"
            )
        if not (self.predictor_lr > 0):
            raise ValueError(f"CountDownConfig.predictor_lr={self.predictor_lr!r} must be > 0")
        if self.tau is not None and not math.isfinite(self.tau):
            raise ValueError(f"CountDownConfig.tau={self.tau!r} must be a finite float or None (calibrated)")
        if self.tau is not None and self.method != "d-countdown":
            raise ValueError(
                f"CountDownConfig.tau applies to method 'd-countdown' only (got method={self.method!r}); "
                "CATS and M-CountDown use calibrated thresholds"
            )
        if not isinstance(self.inductor_options, Mapping):
            raise ValueError("CountDownConfig.inductor_options must be a dict of Inductor config patches")
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
        """Build from the backend's `options=` dict; unknown keys are refused, naming the allowed ones."""
        options = dict(options or {})
        if isinstance(options.get("config"), CountDownConfig):
            base = options.pop("config")
            return dataclasses.replace(base, **_checked_keys(options)) if options else base
        return cls(**_checked_keys(options))

    def replace(self, **changes: Any) -> "CountDownConfig":
        return dataclasses.replace(self, **_checked_keys(changes))


def _checked_keys(options: Mapping[str, Any]) -> dict:
    allowed = [f.name for f in dataclasses.fields(CountDownConfig)]
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown countdown option {key!r}; allowed options are {allowed}")
    return dict(options)
