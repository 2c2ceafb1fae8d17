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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "kwargs, key",
    [
        # bool is an int subclass in Python: True must not pass as 1 where an int is meant
        ({"method": "d-countdown", "predictor_rank": True}, "predictor_rank"),
        ({"method": "d-countdown", "predictor_rank": 8.0}, "predictor_rank"),
        ({"method": "d-countdown", "predictor_rank": "8"}, "predictor_rank"),
        ({"predictor_steps": True}, "predictor_steps"),
        ({"predictor_steps": 10.5}, "predictor_steps"),
        ({"predictor_steps": "10"}, "predictor_steps"),
        ({"predictor_batch_tokens": True}, "predictor_batch_tokens"),
        ({"predictor_batch_tokens": 0}, "predictor_batch_tokens"),
        ({"seed": "a"}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": None}, "seed"),
        # strings, bools, NaN and inf where a finite number is meant
        ({"method": "d-countdown", "tau": "x"}, "tau"),
        ({"method": "d-countdown", "tau": True}, "tau"),
        ({"method": "d-countdown", "tau": NAN}, "tau"),
        ({"method": "d-countdown", "tau": INF}, "tau"),
        ({"predictor_lr": "x"}, "predictor_lr"),
        ({"predictor_lr": True}, "predictor_lr"),
        ({"predictor_lr": NAN}, "predictor_lr"),
        ({"predictor_lr": INF}, "predictor_lr"),
        ({"predictor_lr": 0.0}, "predictor_lr"),
        ({"predictor_lr": None}, "predictor_lr"),
        ({"sparsity": True}, "sparsity"),
        ({"sparsity": INF}, "sparsity"),
        ({"sparsity": None}, "sparsity"),
        ({"inductor_options": [("max_autotune", True)]}, "inductor_options"),
        ({"inductor_options": {1: True}}, "inductor_options"),
    ],
)
def test_wrong_types_and_non_finite_numbers_are_refused_naming_the_key_and_value(kwargs, key):
    with pytest.raises(ValueError) as err:
        CountDownConfig(**kwargs)
    msg = str(err.value)
    assert f"CountDownConfig.{key}=" in msg and repr(kwargs[key]) in msg
    assert "must be" in msg  # ... and says what is allowed


def test_numbers_are_stored_as_plain_python_numbers():
    np = pytest.importorskip("numpy")
    cfg = CountDownConfig(method="d-countdown", sparsity=np.float32(0.5), predictor_rank=np.int64(16),
                          predictor_steps=np.int64(10), predictor_lr=1, tau=2, seed=np.int32(3))
    assert (cfg.sparsity, cfg.predictor_rank, cfg.predictor_steps, cfg.predictor_lr, cfg.tau, cfg.seed) == \
        (0.5, 16, 10, 1.0, 2.0, 3)
    assert [type(v) for v in (cfg.sparsity, cfg.predictor_rank, cfg.predictor_steps, cfg.predictor_lr, cfg.tau,
                              cfg.seed)] == [float, int, int, float, float, int]
    assert CountDownConfig(seed=-1).seed == -1


@pytest.mark.parametrize("key, value", [("tau", 0.5), ("predictor_rank", 32)])
def test_predictor_fields_run_as_ideal_warn_that_they_are_ignored(key, value):
    # the default regime is "ideal": building such a config is legitimate (calibrate() makes a "prac"
    # calibration from it; with calibration=... the backend turns it "prac"), so construction stays silent ...
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = CountDownConfig(method="d-countdown", **{key: value})
        CountDownConfig.from_options({"config": cfg, "calibration": object()})  # runs as "prac" in resolve()
        CountDownConfig.from_options({"method": "d-countdown", "regime": "prac", key: value})
    # ... but running it as "ideal" (no calibration) would silently ignore the value: warn, naming key and fix
    for options in ({"config": cfg}, {"method": "d-countdown", key: value}):
        with pytest.warns(UserWarning, match=rf"CountDownConfig\.{key}={value!r} is ignored.*ideal.*regime='prac'"):
            CountDownConfig.from_options(options)


@pytest.mark.parametrize("key, value", [("tau", 0.5), ("predictor_rank", 32)])
def test_backend_resolve_warns_when_predictor_fields_would_be_ignored(key, value):
    from countdown_fx.backend import resolve

    with pytest.warns(UserWarning, match=rf"{key}={value!r} is ignored"):
        config, calibration = resolve({"method": "d-countdown", key: value})
    assert config.regime == "ideal" and calibration is None


def test_a_config_knows_which_fields_were_passed_to_it():
    """What a calibration may fill in: the fields its author did not pass (positional, keyword or through
    replace()), whatever their values; equality and hashing ignore the difference."""
    import copy
    import pickle

    passed = CountDownConfig("m-countdown", 0.7, apply_to="decode")
    assert passed.stated_fields == {"method", "sparsity", "apply_to"}
    assert CountDownConfig().stated_fields == frozenset()
    assert passed == CountDownConfig() and hash(passed) == hash(CountDownConfig())
    changed = passed.replace(tau=None, method="d-countdown")
    assert changed.stated_fields == {"method", "sparsity", "apply_to", "tau"}
    assert CountDownConfig.from_options({"config": passed, "seed": 3}).stated_fields == passed.stated_fields | {"seed"}
    assert CountDownConfig.from_options({"regime": "prac"}).stated_fields == {"regime"}
    for copied in (pickle.loads(pickle.dumps(changed)), copy.deepcopy(changed), copy.copy(changed)):
        assert copied.stated_fields == changed.stated_fields
