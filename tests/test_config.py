import pytest

from countdown_fx import CountDownConfig


def test_defaults_are_valid_and_frozen():
    cfg = CountDownConfig()
    assert cfg.method == "m-countdown" and cfg.score == "up" and cfg.apply_to == "decode"
    with pytest.raises(Exception):
        cfg.sparsity = 0.5


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"method": "countdown"}, ["method", "cats", "m-countdown", "d-countdown"]),
        ({"regime": "oracle"}, ["regime", "ideal", "prac"]),
        ({"sparsity": 1.0}, ["sparsity", "[0, 1)"]),
        ({"sparsity": -0.1}, ["sparsity", "[0, 1)"]),
        ({"sparsity": float("nan")}, ["sparsity"]),
        ({"sparsity": "0.7"}, ["sparsity"]),
        ({"apply_to": "prefill"}, ["apply_to", "all", "decode"]),
        ({"threshold_rule": "median"}, ["threshold_rule", "mean-kth", "quantile"]),
        ({"mode": "fast"}, ["mode", "reduce-overhead"]),
        ({"method": "cats", "tau": 0.5}, ["tau", "d-countdown"]),
        ({"method": "m-countdown", "predictor_rank": 64}, ["predictor_rank", "d-countdown"]),
        ({"method": "d-countdown", "predictor_rank": 0}, ["predictor_rank"]),
    ],
)
def test_invalid_values_name_the_key_and_the_allowed_values(kwargs, words):
    with pytest.raises(ValueError) as err:
        CountDownConfig(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_options_map_one_to_one_and_unknown_keys_are_refused():
    cfg = CountDownConfig.from_options({"method": "cats", "sparsity": 0.5, "regime": "ideal"})
    assert (cfg.method, cfg.sparsity, cfg.regime, cfg.score) == ("cats", 0.5, "ideal", "gate")
    with pytest.raises(ValueError, match="unknown countdown option 'sparsity_level'.*'sparsity'"):
        CountDownConfig.from_options({"sparsity_level": 0.5})
    assert CountDownConfig.from_options(None) == CountDownConfig()
