import json
import warnings

import pytest

from had_hf import HADConfig


def test_defaults_and_exactly_one_n_rule():
    assert HADConfig().top_n == 30
    assert HADConfig(top_n_ratio=0.117).top_n is None
    with pytest.raises(ValueError, match="exactly one of top_n and top_n_ratio"):
        HADConfig(top_n=30, top_n_ratio=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_n": 0}, "top_n must be a positive integer"),
        ({"top_n": 2.5}, "top_n must be a positive integer"),
        ({"top_n_ratio": 0.0}, r"top_n_ratio must be a number in \(0, 1\]"),
        ({"top_n_ratio": 1.5}, r"top_n_ratio must be a number in \(0, 1\]"),
        ({"top_n_ratio": True}, r"top_n_ratio must be a number in \(0, 1\]"),
        ({"target_modules": "self_attn"}, "target_modules must be a non-empty list"),
        ({"target_modules": ["(unclosed"]}, "is not a regular expression"),
        ({"ste_clip": -1}, "ste_clip must be a finite number > 0"),
        ({"sigma_q": [1.0]}, "sigma_q must be a dict"),
        ({"sigma_k": {"layer": -2.0}}, r"sigma_k\['layer'\] must be a finite number > 0"),
        ({"binarize_cross_attention": "yes"}, "binarize_cross_attention must be True or False"),
        ({"sigma_q": {"layer": []}}, r"sigma_q\['layer'\] must be .* a non-empty list"),
        ({"sigma_k": {"layer": [1.0, -0.5]}}, r"sigma_k\['layer'\] must be .* a non-empty list"),
        ({"sigma_per_head": 1}, "sigma_per_head must be True or False"),
        ({"sink_keys": -1}, "sink_keys must be an integer >= 0"),
    ],
)
def test_invalid_values_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HADConfig(**kwargs)


def test_a_value_set_after_construction_is_checked_when_saved():
    # otherwise the checkpoint saves and then fails to load
    config = HADConfig(top_n=3)
    config.ste_clip = 0
    with pytest.raises(ValueError, match="ste_clip must be a finite number > 0"):
        config.to_dict()
    config = HADConfig(top_n=3)
    config.top_n_ratio = 0.1
    with pytest.raises(ValueError, match="Set exactly one of top_n and top_n_ratio"):
        config.to_json_string()


def test_num_kept_ratio_rule_is_ceiling():
    config = HADConfig(top_n_ratio=15 / 128)
    assert config.num_kept(128) == 15
    assert config.num_kept(1024) == 120
    assert config.num_kept(100) == 12  # ceil(11.71875)
    assert config.num_kept(1) == 1
    assert HADConfig(top_n=7).num_kept(1000) == 7


def test_sigmas_default_to_one_for_uncalibrated_layers():
    config = HADConfig(sigma_q={"a": 2.0}, sigma_k={"a": 3.0})
    assert config.sigmas("a") == (2.0, 3.0)
    assert config.sigmas("b") == (1.0, 1.0)
    assert config.is_calibrated and not HADConfig().is_calibrated


def test_per_head_sigmas_are_tuples_and_flagged():
    config = HADConfig(sigma_q={"a": [2.0, 1.0], "b": 1.5}, sigma_k={"a": [3, 4]})
    assert config.sigmas("a") == ((2.0, 1.0), (3.0, 4.0))
    assert config.sigmas("b") == (1.5, 1.0)
    assert config.has_per_head_sigma and not HADConfig(sigma_q={"a": 2.0}).has_per_head_sigma


def test_json_round_trip_and_unknown_keys_dropped_with_warning():
    config = HADConfig(top_n_ratio=0.25, sigma_q={"x": 1.5}, sigma_k={"x": 0.5}, target_modules=["attn"])
    data = json.loads(config.to_json_string())
    assert data["quant_method"] == "had"
    assert "stage" not in data and "c" not in data  # runtime state, never saved
    assert HADConfig.from_dict(data) == config
    data["a_field_from_the_future"] = 1
    with pytest.warns(UserWarning, match="a_field_from_the_future"):
        assert HADConfig.from_dict(data) == config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HADConfig.from_dict(config.to_dict())


def test_saved_in_model_config_json(tmp_path):
    import had_hf
    from tests.conftest import build_model

    config = HADConfig(top_n=5, sink_keys=1, sigma_q={"q": 1.25}, sigma_k={"q": 0.75})
    model = had_hf.convert(build_model("bert"), config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["top_n"] == 5
    assert saved["quantization_config"]["sink_keys"] == 1
    assert HADConfig.from_dict(saved["quantization_config"]) == config
    assert saved["quantization_config"]["sigma_q"] == {"q": 1.25}
    assert saved["attn_implementation"] == "hamming_topk"


def test_training_stage_of_an_old_checkpoint_is_dropped():
    """Configs saved by had_hf 0.1 carried `stage` and `c`: the inference stage is dropped silently, any other with
    a warning (a loaded model is always in the inference stage)."""
    saved = HADConfig(top_n=4).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HADConfig.from_dict({**saved, "stage": "binary", "c": 0.05}) == HADConfig(top_n=4)
    with pytest.warns(UserWarning, match="Ignoring the saved training stage 'ste'"):
        assert HADConfig.from_dict({**saved, "stage": "ste", "c": 0.05}) == HADConfig(top_n=4)


def test_config_reads_like_a_dict_for_transformers():
    config = HADConfig(top_n=4)
    assert config.get("quant_method") == "had" and config.get("top_n") == 4
    assert config.get("no_such_field", "fallback") == "fallback"
