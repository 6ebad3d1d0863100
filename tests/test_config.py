from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from distres.config import Config, ConfigError, help_text, load_config, save_config

# (arguments, words the one-line message must contain). Each is a different kind of mistake.
BAD = [
    (["train.batch_size=0"], ["train.batch_size", "0"]),
    (["train.epochs=-3"], ["train.epochs", "-3"]),
    (["train.bogus=1"], ["train.bogus", "unknown key"]),
    (["nosuchsection.x=1"], ["nosuchsection", "unknown key"]),
    (["train.epochs=ten"], ["train.epochs", "ten"]),
    (["model.plain=maybe"], ["model.plain", "maybe"]),
    (["model.name=resnet9"], ["model.name", "resnet9"]),
    (
        ["data.dataset=shards", "data.train_shards=/no/such/dir", "data.val_shards=/no/such/dir"],
        ["data.train_shards", "/no/such/dir"],
    ),
    (["data.dataset=shards"], ["data.train_shards", "empty"]),
    (["model.name=resnet50"], ["data.image_size", "32", "resnet50"]),
    (["data.image_size=224"], ["data.image_size", "224", "resnet20"]),
    (["optim.lr=0"], ["optim.lr", "0"]),
    (["optim.name=adam"], ["optim.name", "adam"]),
    (["train.precision=fp8"], ["train.precision", "fp8"]),
    (["model.num_classes=100"], ["model.num_classes", "100", "digits"]),
    (["model.plain=true", "model.zero_init_residual=true"], ["model.plain", "zero_init_residual"]),
    (["early_stop.monitor=train/loss"], ["early_stop.monitor", "train/loss"]),
    (["train.epochs"], ["train.epochs", "section.key=value"]),
    (["--config", "configs/nope.yaml"], ["configs/nope.yaml", "no such file"]),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_exits_2_with_one_line(args, words, tmp_path):
    proc = run_cli(*args, f"run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists()  # nothing started


def test_bad_yaml_preset_names_file_and_key(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("train:\n  batch_szie: 32\n")
    with pytest.raises(ConfigError, match=r"train\.batch_szie: unknown key.*bad\.yaml"):
        load_config(preset)
    preset.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(preset)


def test_precedence_defaults_then_preset_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  epochs: 7\n  batch_size: 16\n")
    cfg = load_config(preset, ["train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.name) == (3, 16, "resnet20")


def test_default_preset_is_the_embedded_default():
    assert load_config(REPO / "configs" / "digits_resnet20.yaml") == load_config()


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(preset, digits_dirs):
    raw = yaml.safe_load(preset.read_text())
    overrides = []
    if raw.get("data", {}).get("dataset") == "shards":  # point the paths at real shards
        overrides = [f"data.train_shards={digits_dirs[0]}", f"data.val_shards={digits_dirs[1]}"]
    cfg = load_config(preset, overrides)
    assert isinstance(cfg, Config)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        None, ["train.epochs=4", "optim.name=adamw", "data.mean=[0.5]", "data.std=[0.25]"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_off_is_read_as_the_word():
    assert load_config(None, ["tracking.progress=off"]).tracking.progress == "off"


def test_help_lists_every_key_with_a_doc():
    text = help_text()
    for section in (
        "run",
        "model",
        "data",
        "optim",
        "train",
        "engine",
        "checkpoint",
        "early_stop",
        "tracking",
    ):
        assert f"\n{section}:" in f"\n{text}"
    for line in text.splitlines():
        if line.startswith("  "):
            assert len(line.split(None, 1)) == 2, f"no doc: {line}"
    proc = run_cli("--help")
    assert proc.returncode == 0 and "train.batch_size" in proc.stdout


def test_empty_overrides_give_defaults():
    assert load_config(None, []) == Config()
    assert Path(REPO / "configs").is_dir()


def test_batch_larger_than_a_ranks_data_is_a_config_error(tmp_path):
    proc = run_cli("train.batch_size=5000", f"run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "train.batch_size=5000" in line and "1436" in line
