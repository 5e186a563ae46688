import pytest
import yaml

from mer.config import ConfigError, load_config, save_config, stable_hash


def test_defaults_load_and_cover_every_stage():
    cfg = load_config()
    for section in ("data", "preprocess", "model", "train", "ensemble", "submission"):
        assert section in cfg


def test_set_overrides_parse_types():
    cfg = load_config(overrides=["train.lr=1e-3", "train.epochs=7", "preprocess.flow=dis",
                                 "train.seeds=[4, 5]", "train.augment.mirror=0"])
    assert cfg["train"]["lr"] == pytest.approx(1e-3)
    assert cfg["train"]["epochs"] == 7
    assert cfg["preprocess"]["flow"] == "dis"
    assert cfg["train"]["seeds"] == [4, 5]
    assert cfg["train"]["augment"]["mirror"] == 0.0 and isinstance(cfg["train"]["augment"]["mirror"], float)
    # a whole number written as a float where an int is expected is that int; a fraction is kept (and refused later)
    cfg = load_config(overrides=["preprocess.farneback_iters=2.0", "train.epochs=7.5"])
    assert cfg["preprocess"]["farneback_iters"] == 2 and isinstance(cfg["preprocess"]["farneback_iters"], int)
    assert cfg["train"]["epochs"] == 7.5


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*did you mean 'train.epochs'"):
        load_config(overrides=["train.epoch=3"])
    f = tmp_path / "c.yaml"
    f.write_text("preprocess:\n  flw: dis\n")
    with pytest.raises(ConfigError, match=r"'preprocess.flw' in .*c.yaml.*'preprocess.flow'"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*'train'"):
        load_config(overrides=["trian.lr=1"])


def test_bad_values_and_syntax_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="expects int"):
        load_config(overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(overrides=["train.epochs"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(overrides=["train=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_file_then_set_and_saved_config_round_trips(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\n  lr: 0.01\n")
    cfg = load_config(f, ["train.lr=0.02"])
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["lr"] == pytest.approx(0.02)
    out = save_config(cfg, tmp_path / "run" / "config.yaml", command="test")
    assert yaml.safe_load(out.read_text())["_meta"]["command"] == "test"
    assert load_config(out) == cfg  # a saved config is a valid --config file


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
