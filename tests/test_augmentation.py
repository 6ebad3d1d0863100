"""Modern recipes: auto-augmentation in both backends (the same operators and magnitudes),
batch augmentation on the device (color jitter, random erasing, mixup/cutmix with soft
targets), the bce loss, stochastic depth and a separate evaluation size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from augment_stats import (
    ALLOWANCE,
    DRAWS,
    GEOMETRIC,
    ROUGHNESS_TOL,
    SIZE,
    differ,
    one_op_torch,
    roughness,
    sample_image,
    stats,
)
from torchvision.transforms import v2

from distres.artifacts.final import save_inference_info
from distres.config import ConfigError, load_config
from distres.data import build_loaders
from distres.data.api import Batch
from distres.data.augment import BatchAugment, BatchAugmentSpec, spec_from_config
from distres.data.dali.loader import dali_available
from distres.data.spec import LoaderSpec
from distres.engine.base import train_loss
from distres.models.resnet import blocks_in, resnet

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI not installed")
ALL_BATCH = dict(color_jitter=0.4, random_erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0)


def _batch(n=16, c=3, size=24, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    return Batch(x, torch.randint(0, classes, (n,), generator=g))


def _augment(rank=0, seed=0, **kw):
    spec = BatchAugmentSpec(num_classes=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), **kw)
    return BatchAugment(spec, seed, rank, torch.device("cpu"))


# -- batch augmentation -------------------------------------------------------------------
def test_batch_augmentation_is_a_function_of_seed_rank_step_and_micro_batch():
    batch = _batch()
    first = _augment(**ALL_BATCH)([batch, batch], step=7)
    again = _augment(**ALL_BATCH)([batch, batch], step=7)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert first[0].images.is_contiguous(memory_format=torch.channels_last)
    # the two micro-batches of one step, another step, another rank, another seed: all differ
    others = [
        first[1],
        _augment(**ALL_BATCH)([batch], step=8)[0],
        _augment(rank=1, **ALL_BATCH)([batch], step=7)[0],
        _augment(seed=1, **ALL_BATCH)([batch], step=7)[0],
    ]
    for other in others:
        assert not torch.equal(other.images, first[0].images)


def test_mixup_targets_sum_to_one_and_match_the_pixels_proportions():
    batch = _batch()
    aug = _augment(mixup_alpha=0.4)
    for step in range(20):
        images, targets = aug([batch], step)[0]
        lam = aug.last[0]["mix"]["lam"]
        assert torch.allclose(targets.sum(1), torch.ones(16))
        expected = batch.images * lam + batch.images.flip(0) * (1 - lam)
        assert torch.allclose(images, expected, atol=1e-6)
        own = targets[torch.arange(16), batch.labels]
        other = targets[torch.arange(16), batch.labels.flip(0)]
        same = batch.labels == batch.labels.flip(0)
        assert torch.allclose(own[~same], torch.full_like(own[~same], lam), atol=1e-6)
        assert torch.allclose(other[~same], torch.full_like(other[~same], 1 - lam), atol=1e-6)


def test_cutmix_targets_equal_the_share_of_pasted_pixels():
    g = torch.Generator().manual_seed(3)
    # every image a constant, so each pixel says which image it came from
    values = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1)
    images = values.expand(16, 3, 24, 20).contiguous()
    labels = torch.randperm(10, generator=g).repeat(2)[:16]
    aug = _augment(cutmix_alpha=1.0, label_smoothing=0.1)
    boxes = set()
    for step in range(30):
        out, targets = aug([Batch(images, labels)], step)[0]
        assert torch.allclose(targets.sum(1), torch.ones(16), atol=1e-6)
        pasted = (out != images).float().mean((1, 2, 3))  # share from the partner
        lam = aug.last[0]["mix"]["lam"]
        boxes.add(aug.last[0]["mix"]["box"])
        for i in range(16):
            if labels[i] == labels[15 - i] or i == 15 - i:
                continue
            smooth = 0.1 / 10
            assert targets[i, labels[15 - i]].item() == pytest.approx(
                (1 - lam) * (0.9 + smooth) + lam * smooth, abs=1e-5
            )
            assert pasted[i].item() == pytest.approx(1 - lam, abs=1e-6)
    assert len(boxes) > 20  # boxes vary


def _lams_from_pixels(aug: BatchAugment, steps: int) -> np.ndarray:
    """lam of each step read off the pixels (never from what the augmenter says it drew):
    image i is the constant i, so a mixed image 0 holds (1 - lam) * 15 and a cut image 0
    holds 15 on the share 1 - lam of its area."""
    n, size = 16, 64
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size)
    batch = Batch(images.contiguous(), torch.arange(n) % 10)
    lams = []
    for step in range(steps):
        first = aug([batch], step)[0].images[0]
        cut = (first == 15).float().mean().item()
        lams.append(1 - cut if cut > 0 or (first == 0).all() else 1 - first.mean().item() / 15)
    return np.array(lams)


def test_mixup_and_cutmix_draw_lam_from_beta_alpha_alpha():
    """Mixup's lam follows Beta(a, a) (a one-sample KS test against scipy's), and cutmix's
    kept share follows timm's own draw (Beta(a, a), then its box and lam correction: a
    two-sample KS test). Alphas away from 1, where Beta(a, a) is no uniform. The draws are
    seeded, so the p-values are fixed numbers, not chances (measured 0.17 and 0.28; a
    uniform lam gives 9e-13 and 4e-24)."""
    from scipy import stats
    from timm.data.mixup import cutmix_bbox_and_lam

    lams = _lams_from_pixels(_augment(mixup_alpha=0.4), 600)
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    kept = _lams_from_pixels(_augment(cutmix_alpha=0.3), 600)
    rng = np.random.default_rng(0)
    timms = [cutmix_bbox_and_lam((64, 64), rng.beta(0.3, 0.3))[1] for _ in range(20_000)]
    assert stats.ks_2samp(kept, timms).pvalue > 0.01
    # and the test tells them apart: a uniform draw, or the other alpha, is rejected
    assert stats.kstest(rng.uniform(size=600), stats.beta(0.4, 0.4).cdf).pvalue < 1e-4
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-4


def test_mix_prob_and_switch_prob_choose_as_asked():
    batch = _batch()
    none = _augment(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.0)
    assert not none.spec.mixing
    aug = _augment(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.5, mix_switch_prob=0.25)
    kinds = []
    for step in range(400):
        aug([batch], step)
        mix = aug.last[0]["mix"]
        kinds.append("none" if mix["lam"] == 1.0 else "cutmix" if mix["box"] else "mixup")
    share = {k: kinds.count(k) / len(kinds) for k in ("none", "mixup", "cutmix")}
    assert share["none"] == pytest.approx(0.5, abs=0.07)
    assert share["cutmix"] == pytest.approx(0.5 * 0.25, abs=0.05)
    assert share["mixup"] == pytest.approx(0.5 * 0.75, abs=0.07)


def test_random_erasing_boxes_and_noise():
    """On a constant image, so what fills a box can only be the noise: a box of shifted or
    copied image pixels would have the image's value and no spread."""
    batch = Batch(
        torch.full((64, 3, 32, 32), 3.0).contiguous(memory_format=torch.channels_last),
        torch.zeros(64, dtype=torch.int64),
    )
    aug = _augment(random_erasing=0.5)
    hits, areas = 0, []
    for step in range(10):
        out = aug([batch], step)[0].images
        for i, (top, left, h, w) in enumerate(aug.last[0]["erase"]):
            changed = (out[i] != batch.images[i]).any(0)
            if h == 0:
                assert not changed.any()
                continue
            hits += 1
            assert top >= 0 and top + h <= 32 and left >= 0 and left + w <= 32
            areas.append(h * w / 32**2)
            region = out[i, :, top : top + h, left : left + w]
            assert changed[top : top + h, left : left + w].float().mean() > 0.99
            assert changed.sum() == h * w  # nothing outside the box
            if h * w >= 64:  # standard normal per pixel and channel
                assert abs(region.mean().item()) < 0.5 and 0.6 < region.std().item() < 1.4
                assert not torch.equal(region[0], region[1])
    assert hits / 640 == pytest.approx(0.5, abs=0.06)
    assert min(areas) >= 0.015 and max(areas) <= 0.36


def test_the_trainer_built_from_the_config_augments_every_training_step(tmp_path):
    """Through build.py, as a run builds it: with jitter, erasing, mixup and cutmix set in the
    config, every step's micro-batches reach the engine as BatchAugment draws them from the
    loader's batches at that step (soft targets, changed pixels), never as loaded."""
    from distres.config import plan_batch
    from distres.dist import DistEnv
    from distres.trainer.build import build

    overrides = [f"data.{k}={v}" for k, v in ALL_BATCH.items() if k in ("color_jitter",
                 "random_erasing")]  # fmt: skip
    overrides += [f"train.{k}={v}" for k, v in ALL_BATCH.items() if k.endswith("_alpha")]
    cfg = load_config(None, [*overrides, "train.max_steps=3", "train.batch_size=16",
                             "train.grad_accum=2", "checkpoint.every_epochs=0",
                             "checkpoint.on_stop=false", "checkpoint.save_final=false",
                             "tracking.progress=off", "tracking.plots=false",
                             f"run.dir={tmp_path}"])  # fmt: skip
    cpu = torch.device("cpu")
    trainer = build(cfg, DistEnv(), cpu, plan_batch(cfg, 1), tmp_path)
    reference = BatchAugment(spec_from_config(cfg), cfg.run.seed, 0, cpu)
    loaded, seen = [], []
    steps, train_step = trainer.optimizer_steps, trainer.engine.train_step

    def recording_steps():
        for group in steps():
            loaded.append(group)
            yield group

    def spy(micro_batches, grad_norm=False):
        seen.append((trainer.state.step, micro_batches))
        return train_step(micro_batches, grad_norm)

    trainer.optimizer_steps, trainer.engine.train_step = recording_steps, spy
    trainer.fit()
    assert [s for s, _ in seen] == [0, 1, 2] and len(loaded) == 3
    for (step, got), raw in zip(seen, loaded, strict=True):
        want = reference(raw, step)
        assert len(got) == len(raw) == 2
        for g, w, r in zip(got, want, raw, strict=True):
            assert g.labels.shape == (16, 10) and torch.equal(g.labels, w.labels)
            assert torch.equal(g.images, w.images) and not torch.equal(g.images, r.images)


def test_color_jitter_matches_torchvision_for_the_drawn_factors_and_order():
    """One image, the factors and order our jitter drew, replayed with torchvision's
    functional ops (on 0-1 floats): the same pixels."""
    from torchvision.transforms.v2 import functional as TF

    spec = dict(color_jitter=0.4)
    aug = _augment(**spec)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = Batch((pixels - mean) / std, torch.zeros(4, dtype=torch.int64))
    out = aug([batch], 0)[0].images * std + mean
    factors, order = aug.last[0]["jitter"]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(4):
        x = pixels[i]
        for op in order[i]:
            x = ops[op](x, float(factors[i, op]))
        assert torch.allclose(out[i], x, atol=1e-5)
    assert factors.min() >= 0.6 and factors.max() <= 1.4


def test_soft_targets_without_mixing_give_the_label_smoothed_loss():
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (16,))
    cfg = load_config(None, ["train.label_smoothing=0.1"])
    aug = _augment(label_smoothing=0.1)
    soft = aug.targets(labels, 1.0)
    assert torch.allclose(
        train_loss(logits, soft, cfg.train), train_loss(logits, labels, cfg.train)
    )
    bce = load_config(None, ["train.loss=bce", "train.bce_threshold=0.2"]).train
    mixed = aug.targets(labels, 0.7)
    expected = F.binary_cross_entropy_with_logits(logits, (mixed > 0.2).float())
    assert torch.allclose(train_loss(logits, mixed, bce), expected)
    # hard labels under bce: one-hot (0.1 smoothing puts 0.01 off-target: below 0.2)
    one_hot = F.one_hot(labels, 10).float()
    assert torch.allclose(
        train_loss(logits, labels, bce), F.binary_cross_entropy_with_logits(logits, one_hot)
    )


def test_batch_augment_config_keys_and_their_checks():
    cfg = load_config(
        None,
        [
            "data.color_jitter=0.3",
            "data.random_erasing=0.25",
            "train.mixup_alpha=0.1",
            "train.cutmix_alpha=1.0",
            "train.mix_switch_prob=0.3",
        ],
    )
    spec = spec_from_config(cfg)
    assert spec.enabled and spec.mixing and spec.mix_switch_prob == 0.3
    assert not spec_from_config(load_config(None, [])).enabled
    for bad, key in [
        ("train.mixup_alpha=-1", "train.mixup_alpha"),
        ("train.mix_prob=1.5", "train.mix_prob"),
        ("data.random_erasing=2", "data.random_erasing"),
        ("train.loss=focal", "train.loss"),
        ("data.auto_augment=augmix", "data.auto_augment"),
        ("data.ra_magnitude=31", "data.ra_magnitude"),
        ("model.drop_path_rate=0.1 model.plain=true", "model.drop_path_rate"),
        ("data.ra_magnitude=12", "data.ra_magnitude=12 has no effect here"),
        (
            "data.auto_augment=autoaugment model.in_chans=1 data.mean=[0.5] data.std=[0.5]",
            "defined on RGB images",
        ),
        ("train.loss=ce train.bce_threshold=0.3", "train.bce_threshold=0.3 has no effect"),
        ("train.mixup_alpha=0.2 train.mix_switch_prob=0.3", "needs both train.mixup_alpha"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, bad.split())


# -- stochastic depth ---------------------------------------------------------------------
def test_drop_path_is_linear_per_block_identity_in_eval_and_adds_no_parameters():
    torch.manual_seed(0)
    plain = resnet("resnet20", num_classes=10)
    dropped = resnet("resnet20", num_classes=10, drop_path_rate=0.2)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    rates = [b.drop_path for b in blocks_in(dropped)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert np.allclose(np.diff(rates), 0.2 / (len(rates) - 1))
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 32, 32)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(x), dropped(x))
    plain.train(), dropped.train()
    torch.manual_seed(1)
    a = dropped(x)
    torch.manual_seed(1)
    b = dropped(x)
    assert torch.equal(a, b)  # drawn from torch's RNG (which checkpoints restore)
    assert not torch.allclose(a, plain(x))


def test_drop_branch_is_torchvisions_stochastic_depth_without_importing_torchvision():
    import subprocess
    import sys

    from torchvision.ops import stochastic_depth

    from distres.models.resnet import drop_branch

    block = torch.nn.Module()
    block.drop_path = 0.3
    x = torch.randn(64, 8, 4, 4)
    torch.manual_seed(5)
    ours = drop_branch(block, x)
    torch.manual_seed(5)
    assert torch.equal(ours, stochastic_depth(x, 0.3, "row", training=True))
    # a DALI run never imports torchvision (2-3 s per rank); the model must not either
    code = "import sys, distres.trainer.build; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- evaluation size ----------------------------------------------------------------------
def test_val_size_sets_the_evaluation_crop_in_both_backends_and_inference_json(tmp_path):
    over = ["data.image_size=24", "data.val_size=32", "data.crop_padding=2", "train.batch_size=8"]
    backends = ["torch", *(["dali"] if dali_available() else [])]
    for backend in backends:
        cfg = load_config(None, [*over, f"data.backend={backend}"])
        train, val = build_loaders(cfg, torch.device("cpu"))
        assert next(iter(train)).images.shape[-2:] == (24, 24), backend
        assert next(iter(val)).images.shape[-2:] == (32, 32), backend
        train.close(), val.close()
    save_inference_info(tmp_path, cfg, {str(i): i for i in range(10)})
    assert json.loads((tmp_path / "inference.json").read_text())["image_size"] == 32
    with pytest.raises(ConfigError, match=r"data.val_resize=200: must be 0 or >= data.val_size"):
        load_config("configs/resnet50_imagenet.yaml", ["data.val_size=224", "data.val_resize=200"])
    with pytest.raises(ConfigError, match=r"data.val_size=96 with model.name=resnet20"):
        load_config(None, ["data.val_size=96"])
    fast = load_config("configs/resnet50_imagenet_fast.yaml", [])
    assert (fast.data.image_size, fast.data.eval_size, fast.data.val_resize) == (192, 224, 256)


# -- auto-augmentation ---------------------------------------------------------------------
AA_OVER = [
    "data.image_size=24",
    "train.batch_size=8",
    "data.random_resized_crop=true",
    "train.epochs=1",  # no next-epoch pipeline defined in the background
]


@pytest.mark.parametrize(
    "backend, name",
    [
        ("torch", "trivialaugment_wide"),
        ("torch", "randaugment"),
        ("torch", "autoaugment"),
        # one DALI case: defining a pipeline with an auto-augmentation takes seconds here,
        # and every DALI operator draws from the pipeline's seed alike (RandAugment's DALI
        # resume is in test_checkpoint's recipe test)
        pytest.param("dali", "trivialaugment_wide", marks=needs_dali),
    ],
)
def test_auto_augment_is_deterministic_for_a_seed_and_changes_with_it(backend, name):
    def first_batches(*extra):
        cfg = load_config(None, [*AA_OVER, f"data.backend={backend}", *extra])
        train, val = build_loaders(cfg, torch.device("cpu"))
        train.set_epoch(0)
        out = [b.images.clone() for _, b in zip(range(2), train, strict=False)]
        train.close(), val.close()
        return torch.stack(out)

    ta = [f"data.auto_augment={name}"]
    a, b = first_batches(*ta), first_batches(*ta)
    assert torch.equal(a, b)
    assert not torch.equal(a, first_batches(*ta, "run.seed=1"))
    assert not torch.equal(a, first_batches())  # the augmentation changes the images


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_an_auto_augmented_epoch_resumes_mid_way_exactly(backend):
    """The position a loader saves after 3 batches (torch: the batch count, replayed with the
    same seeded draws; DALI: its pipeline checkpoint, RandAugment's state included) gives the
    batches an uninterrupted pass gives after it."""
    over = [*AA_OVER, f"data.backend={backend}", "data.auto_augment=randaugment"]
    cfg = load_config(None, [*over, "train.epochs=3"])  # DALI defines epoch 2's meanwhile
    whole, _ = build_loaders(cfg, torch.device("cpu"))
    whole.set_epoch(1)
    expected, state = [], None
    for i, b in zip(range(5), whole, strict=False):
        expected.append(b.images.clone())
        if i == 2:
            state = whole.state_dict()
    whole.close()
    resumed, _ = build_loaders(cfg, torch.device("cpu"))
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    got = [b.images.clone() for _, b in zip(range(2), resumed, strict=False)]
    resumed.close()
    assert all(torch.equal(x, y) for x, y in zip(got, expected[3:], strict=True))
    # DALI defines the next epoch's pipeline in a thread: a daemon one, or distres's fast
    # exit (distres.log.exit_process) would fall back to Python's seconds-long teardown
    import threading

    main = threading.main_thread()
    assert not [t for t in threading.enumerate() if t is not main and not t.daemon]


def test_decoding_in_the_main_process_leaves_torchs_global_rng_alone():
    """With num_workers=0 the augmentation draws happen in the training process, whose
    global RNG the model draws from too (stochastic depth): the loader must neither reseed
    nor advance it, or a resumed run's masks would differ."""
    cfg = load_config(None, [*AA_OVER, "data.backend=torch", "data.auto_augment=randaugment"])
    train, _ = build_loaders(cfg, torch.device("cpu"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in zip(range(3), train, strict=False):
        pass
    assert torch.equal(torch.get_rng_state(), before)


@needs_dali
@pytest.mark.parametrize(
    "name, transform",
    [
        ("trivialaugment_wide", v2.TrivialAugmentWide),
        ("randaugment", v2.RandAugment),
        ("autoaugment", v2.AutoAugment),
    ],
)
def test_dali_suites_have_torchvisions_operators_magnitudes_and_policy(name, transform):
    """The DALI side is built from torchvision's tables: the same operators, each with the
    same magnitude per bin and the same random sign; AutoAugment's sub-policies verbatim."""
    from distres.data.dali import graph as dali_graph

    bins = 10 if name == "autoaugment" else 31
    ours = dali_graph.auto_augment_suite(name, SIZE)
    space = transform._AUGMENTATION_SPACE
    assert set(ours) == set(space)
    for op, (magnitudes, signed) in space.items():
        aug = ours[op]
        expected = magnitudes(bins, SIZE, SIZE)
        if expected is None:
            assert aug.mag_range is None, op
            continue
        got = np.linspace(*aug.mag_range, bins)
        if op.startswith("Translate"):  # in whole pixels, as torchvision's int(magnitude)
            shift = [aug.mag_to_param(v)[op == "TranslateY"] for v in (got[1], -got[1])]
            assert shift == [np.trunc(got[1]), -np.trunc(got[1])], op
        if op == "Solarize":
            got = got / 255  # torchvision's is a fraction of the largest value
        if op == "Posterize":
            got = np.round(got)  # DALI rounds the bit count (poster_mask_uint8)
        assert np.allclose(got, expected.numpy(), atol=1e-4), op
        assert aug.randomly_negate == signed, op
    if name == "autoaugment":
        policy = transform(v2.AutoAugmentPolicy.IMAGENET)._policies
        assert [tuple(s) for s in dali_graph.AUTOAUGMENT_IMAGENET] == [tuple(s) for s in policy]


@needs_dali
def test_auto_augment_operators_agree_between_backends_statistically():
    from nvidia.dali import fn, pipeline_def, types

    from distres.data.dali import graph as dali_graph

    image = sample_image()
    torch.manual_seed(0)
    chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    cases = [("trivialaugment_wide", 0), ("randaugment", 18)]
    suites = {name: dali_graph.auto_augment_suite(name, SIZE) for name, _ in cases}

    @pipeline_def(
        batch_size=DRAWS,
        num_threads=1,
        device_id=None,
        seed=5,
        enable_conditionals=True,
    )
    def pipe():
        data = fn.external_source(
            source=lambda: [image] * DRAWS,
            layout="HWC",
            batch=True,
            dtype=types.UINT8,
        )
        outs = []
        for name, m in cases:
            for op in suites[name].values():
                outs.append(dali_graph.auto_augment(data, name, SIZE, m, 1, suite=[op]))
        # and AutoAugment's ImageNet policy as a whole (torchvision's table, in DALI)
        outs.append(dali_graph.auto_augment(data, "autoaugment", SIZE, 0, 0))
        return tuple(outs)

    p = pipe()
    p.build()
    dali_out = [np.stack([np.asarray(t) for t in o]) for o in p.run()]
    failures, k = [], 0
    for name, m in cases:
        for op in suites[name]:
            t = one_op_torch(name, op, m)
            ours = np.stack([t(chw).permute(1, 2, 0).numpy() for _ in range(DRAWS)])
            a, b = stats(ours, image), stats(dali_out[k], image)
            k += 1
            if differ(a, b, ALLOWANCE.get(op, 2.0)):
                ours_, theirs = a.mean(0).round(1).tolist(), b.mean(0).round(1).tolist()
                failures.append(f"{name} m={m} {op}: torchvision {ours_}, DALI {theirs}")
            ratio = roughness(dali_out[k - 1]) / roughness(ours)
            if op in GEOMETRIC and abs(ratio - 1) > ROUGHNESS_TOL:
                failures.append(f"{name} m={m} {op}: DALI/torchvision roughness {ratio:.2f}")
    policy = v2.AutoAugment(
        v2.AutoAugmentPolicy.IMAGENET, interpolation=v2.InterpolationMode.BILINEAR, fill=128
    )
    ours = np.stack([policy(chw).permute(1, 2, 0).numpy() for _ in range(DRAWS)])
    a, b = stats(ours, image), stats(dali_out[k], image)
    if differ(a, b, ALLOWANCE["Equalize"]):  # the policy is half equalize
        ours_, theirs = a.mean(0).round(1).tolist(), b.mean(0).round(1).tolist()
        failures.append(f"autoaugment ImageNet policy: torchvision {ours_}, DALI {theirs}")
    assert not failures, "torchvision / DALI differ:\n" + "\n".join(failures)


def test_auto_augment_in_the_torch_transform_after_crop_and_flip():
    from distres.data.torch.transforms import train_transform

    t = train_transform(24, True, 0.08, 0, True, ("randaugment", 12, 3))
    kinds = [type(op).__name__ for op in t.transforms]
    assert kinds == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment"]
    ra = t.transforms[-1]
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (3, 12, 31)
    assert ra.interpolation == v2.InterpolationMode.BILINEAR
    assert len(ra._AUGMENTATION_SPACE) == 14


# -- repeated augmentation ----------------------------------------------------------------
def _id_shards(tmp_path, n=96, per_shard=8):
    """n constant-colour JPEGs whose colour encodes the sample's number (steps of 10 levels,
    far beyond JPEG's error), in shards of per_shard."""
    import io

    from PIL import Image

    from distres.data.shards.write import write_shards

    def jpeg(i):
        buf = io.BytesIO()
        colour = (10 * (i // 25) + 5, 10 * (i % 25) + 5, 128)
        Image.new("RGB", (8, 8), colour).save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    samples = [(f"s{i:04d}", jpeg(i), i % 10) for i in range(n)]
    write_shards(samples, tmp_path, "x", {str(i): i for i in range(10)}, per_shard)
    from distres.data.shards.read import read_shard_set

    return read_shard_set(tmp_path)


def _ids(images: torch.Tensor) -> list[int]:
    """The sample numbers of a batch of identity-transformed images (0-255 pixel values)."""
    px = images[:, :2].float().mean((2, 3))
    return [round((r - 5) / 10) * 25 + round((g - 5) / 10) for r, g in px.tolist()]


def _rank_loaders(backend, shards, world, repeats):
    common = dict(
        train=True,
        batch_size=4,
        mean=[0.0],
        std=[1 / 255],  # pixels stay 0-255: they name the sample
        num_classes=10,
        world_size=world,
        shuffle_buffer=16,
        repeats=repeats,
    )
    if backend == "dali":
        from distres.data.dali.loader import DaliLoader

        return [
            DaliLoader(LoaderSpec(shards, image_size=8, crop_padding=0, rank=r, **common))
            for r in range(world)
        ]
    from distres.data.torch.loader import ShardLoader
    from distres.data.torch.transforms import train_transform

    t = train_transform(8, False, 0.08, 0, False)
    return [ShardLoader(LoaderSpec(shards, transform=t, rank=r, **common)) for r in range(world)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_repeated_augmentation_spreads_repeats_over_ranks_and_keeps_the_epoch(backend, tmp_path):
    shards = _id_shards(tmp_path)
    world, repeats = 3, 3
    plain = _rank_loaders(backend, shards, world, 1)
    loaders = _rank_loaders(backend, shards, world, repeats)
    seen_by_epoch = []
    for epoch in (0, 1):
        seen: dict[int, list[int]] = {}
        for rank, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            plain[rank].set_epoch(epoch)
            assert len(loader) == len(plain[rank])  # the epoch keeps its length
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                for i in _ids(b.images):
                    seen.setdefault(i, []).append(rank)
            loader.close()
        # every sample seen this epoch: N times, once on each of N ranks
        assert all(sorted(r) == list(range(world)) for r in seen.values()), seen
        assert len(seen) == 96 // repeats
        seen_by_epoch.append(set(seen))
    assert seen_by_epoch[0] != seen_by_epoch[1]  # another third of the set next epoch
    with pytest.raises(ConfigError, match=r"data.aug_repeats"):
        load_config(None, ["data.aug_repeats=0"])
