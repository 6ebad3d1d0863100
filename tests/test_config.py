from pathlib import Path

import pytest
import yaml
from commands import REPO, run_cli

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
    # a shard setting selects the shard dataset, so missing files are noticed
    (
        ["data.train_shards=/data/x-{000..009}.tar", "data.val_shards=/data/v.tar"],
        ["data.train_shards", "x-{000..009}.tar"],
    ),
    (["data.train_shards=/data/x-{000..009}.tar"], ["data.val_shards", "empty"]),
    (["data.dataset=digits", "data.val_shards=/tmp"], ["data.val_shards", "data.dataset=digits"]),
    # a setting that has no effect under the chosen option is refused, not dropped
    (["optim.beta2=0.9"], ["optim.beta2", "no effect", "optim.name=adamw"]),
    (["optim.poly_power=3"], ["optim.poly_power", "optim.schedule=poly"]),
    (["train.global_batch=128", "train.grad_accum=2"], ["train.grad_accum", "global_batch"]),
    (["engine.zero_stage=2"], ["engine.zero_stage", "engine.name=deepspeed"]),
    (["engine.compile=true", "engine.sync_bn=true"], ["engine.compile", "engine.sync_bn"]),
    (["engine.compile_mode=reduce-overhead"], ["engine.compile_mode", "engine.compile=true"]),
    (["engine.compile=true", "engine.compile_mode=fast"], ["engine.compile_mode", "fast"]),
    (["data.decode=nvjpeg"], ["data.decode", "nvjpeg"]),
    (["data.backend=dali", "data.decode=cpu"], ["data.decode=cpu", "torch backend"]),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_exits_2_with_one_line(args, words, tmp_path, capsys):
    from distres.cli.train import main

    code = main([*args, f"run.dir={tmp_path / 'run'}"])  # the CLI's entry point, in-process
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [BAD[0], BAD[7]], ids=["value", "shards"])
def test_bad_config_through_the_cli_is_one_line(args, words, tmp_path):
    proc = run_cli(*args, f"run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "run").exists()


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
    layers = [yaml.safe_load(Path(src).read_text()) for src in _preset_files(preset)]
    overrides = []
    if any(raw.get("data", {}).get("dataset") == "shards" for raw in layers):
        # point the paths at real shards
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


def test_batch_larger_than_a_ranks_data_is_a_config_error(tmp_path, capsys):
    from distres.cli.train import main

    assert main(["train.batch_size=5000", f"run.dir={tmp_path / 'run'}", "run.threads=1"]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "train.batch_size=5000" in line and "1436" in line


def _preset_files(preset: Path) -> list[Path]:
    """The preset and the presets it builds on (`base:`), base first."""
    raw = yaml.safe_load(preset.read_text()) or {}
    base = raw.get("base")
    return [*(_preset_files(preset.parent / base) if base else []), preset]


def test_a_variant_preset_builds_on_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model:\n  name: resnet56\ntrain:\n  epochs: 7\n  batch_size: 16\n"
    )
    (tmp_path / "mid.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 9\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ntrain:\n  batch_size: 32\n")
    cfg = load_config(tmp_path / "top.yaml", ["optim.lr=0.2"])
    assert (cfg.model.name, cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (
        "resnet56",
        9,
        32,
        0.2,
    )


def test_base_preset_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: base .*missing.yaml: no such file"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "b.yaml")


def test_imagenet_presets_keep_their_recipes(digits_dirs):
    """The variants change the batch and what goes with it, not the recipe they cite."""
    shards = [f"data.train_shards={digits_dirs[0]}", f"data.val_shards={digits_dirs[1]}"]
    get = {n: load_config(REPO / "configs" / f"{n}.yaml", shards) for n in (
        "resnet50_imagenet", "resnet50_imagenet_8gpu", "resnet50_imagenet_multinode",
        "resnet50_imagenet_fast", "resnet50_imagenet_fast_multinode",
    )}  # fmt: skip
    classic = get["resnet50_imagenet"]
    assert (classic.train.epochs, classic.optim.lr, classic.optim.warmup_epochs) == (90, 0.1, 5)
    for name in ("resnet50_imagenet_8gpu", "resnet50_imagenet_multinode"):
        c = get[name]
        assert c.optim == classic.optim and c.model == classic.model and c.train.epochs == 90
    assert get["resnet50_imagenet_multinode"].train.global_batch == 8192
    fast, large = get["resnet50_imagenet_fast"], get["resnet50_imagenet_fast_multinode"]
    assert 16 <= fast.train.epochs <= 40 and fast.train.label_smoothing == 0.1
    assert fast.data.train_size(0) < fast.data.train_size(fast.train.epochs - 1)
    # over a 4k global batch the fast recipe switches to a large-batch optimizer
    assert large.train.global_batch > 4096 and large.optim.name in ("lars", "lamb")
    assert fast.train.global_batch <= 4096 and fast.optim.name == "sgd"


def test_shard_settings_select_shards_and_take_every_form(digits_dirs, tmp_path):
    train, val = (str(d) for d in digits_dirs)
    cfg = load_config(None, [f"data.train_shards={train}", f"data.val_shards={val}"])
    assert cfg.data.source == "shards"
    tars = sorted(str(p) for p in digits_dirs[0].glob("*.tar"))
    joined = load_config(None, [f"data.train_shards={'::'.join(tars)}", f"data.val_shards={val}"])
    assert joined.data.train_shards == "::".join(tars)
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"data": {"train_shards": tars, "val_shards": val}}))
    listed = load_config(preset)
    assert listed.data.train_shards == tars and listed.data.source == "shards"
    from distres.data.shards.read import read_shard_set

    assert read_shard_set(listed.data.train_shards).urls == read_shard_set(train).urls
    assert load_config(None, []).data.source == "digits"


def test_a_base_presets_leftovers_are_not_refused(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"optim": {"schedule": "step", "step_milestones": [3, 6]}}))
    variant = tmp_path / "variant.yaml"
    variant.write_text("base: base.yaml\noptim:\n  schedule: cosine\n")
    assert load_config(variant).optim.schedule == "cosine"
    variant.write_text("base: base.yaml\noptim:\n  schedule: cosine\n  step_gamma: 0.5\n")
    with pytest.raises(ConfigError, match=r"optim\.step_gamma=0\.5 has no effect"):
        load_config(variant)
