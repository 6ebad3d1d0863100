"""The DALI graph (`data.backend=dali`): an epoch's pipeline (`epoch_pipeline`: the reader and
the per-image part, `image_graph`: decode, augment, normalise).

`DaliLoader` says which shards and settings each epoch's pipeline gets; the same
operators run on the GPU ("mixed" decoding: nvJPEG) or on the CPU (`device_id=None`).
Augmentation ends in `crop_mirror_normalize` with HWC layout, so the NCHW view the model gets
has channels_last strides with no extra copy. Every random operator draws from the
pipeline's seed, which DALI's pipeline checkpoint restores: a mid-epoch resume is exact.
"""

from __future__ import annotations

import inspect
import warnings

from nvidia.dali import fn, types

# The mixed (GPU) decoder set as NVIDIA's ImageNet pipelines set it. hw_decoder_load: the
# share of images given to the hardware JPEG engines (DALI's default, 0.65, suits A100's one
# engine; H100/H200 have 7, and every image left over is Huffman-decoded by a CPU thread).
# The paddings and size hints preallocate nvJPEG's buffers for ImageNet's largest image, so
# the first epoch does not grow them batch by batch (DALI's resnet50 example's values).
MIXED_DECODER = dict(
    hw_decoder_load=0.99,
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5_980,
    preallocate_height_hint=6_430,
)


# The fill of pixels that shears, translations and rotations uncover (both backends).
AUG_FILL = 128


# torchvision's AutoAugmentPolicy.IMAGENET, the AutoAugment paper's ImageNet policy as
# torchvision lists it: per sub-policy, (operator, probability, magnitude bin of 10). DALI's
# own ImageNet policy is another table (TensorFlow's, with SolarizeAdd), so it is rebuilt here.
AUTOAUGMENT_IMAGENET = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def auto_augment_suite(name: str, size: int) -> dict:
    """DALI's augmentations with torchvision v2's magnitude ranges for `name`, by
    torchvision's operator names (its TrivialAugmentWide / RandAugment / AutoAugment
    `_AUGMENTATION_SPACE`): the torch backend and this one apply the same operators at the same
    magnitudes. DALI's own suites differ in small ways (enhance ranges from 0.01, solarize from
    256, translations relative to other bounds)."""
    from nvidia.dali.auto_aug import augmentations as a

    if name == "trivialaugment_wide":
        shear, shift, angle, enhance, bits = 0.99, 32 / size, 135, 0.99, 2
    else:  # randaugment, autoaugment: translations up to 150/331 of the image
        shear, shift, angle, enhance, bits = 0.3, 150 / 331, 30, 0.9, 4
    suite = {
        "Identity": a.identity,
        "ShearX": a.shear_x.augmentation((0, shear), True),
        "ShearY": a.shear_y.augmentation((0, shear), True),
        # in whole pixels, as torchvision (int(magnitude)): DALI's own relative offsets
        # shift by fractions of a pixel, which bilinear resampling turns into a blur
        "TranslateX": a.translate_x_no_shape.augmentation((0, shift * size), True, _whole_x),
        "TranslateY": a.translate_y_no_shape.augmentation((0, shift * size), True, _whole_y),
        "Rotate": a.rotate.augmentation((0, angle), True),
        "Brightness": a.brightness.augmentation((0, enhance), True, a.shift_enhance_range),
        "Color": a.color.augmentation((0, enhance), True, a.shift_enhance_range),
        "Contrast": a.contrast.augmentation((0, enhance), True, a.shift_enhance_range),
        "Sharpness": a.sharpness.augmentation((0, enhance), True, a.sharpness_kernel),
        "Posterize": a.posterize.augmentation((8, bits), False, a.poster_mask_uint8),
        # torchvision inverts pixels >= 255 * m (m from 1 to 0): threshold 255 down to 0
        "Solarize": a.solarize.augmentation((255, 0)),
        "AutoContrast": a.auto_contrast,
        "Equalize": a.equalize,
    }
    if name == "autoaugment":
        del suite["Identity"]
        suite["Invert"] = a.invert
    return suite


def _whole_x(magnitude: float) -> list[float]:
    return [float(int(magnitude)), 0.0]


def _whole_y(magnitude: float) -> list[float]:
    return [0.0, float(int(magnitude))]


def auto_augment(images, name: str, size: int, magnitude: int, num_ops: int, suite=None):
    """data.auto_augment on uint8 HWC `size` x `size` images (needs the pipeline's
    enable_conditionals); `suite` narrows the operators (the statistics test, one by one)."""
    from nvidia.dali.auto_aug import auto_augment as aa
    from nvidia.dali.auto_aug import rand_augment, trivial_augment
    from nvidia.dali.auto_aug.core import Policy

    # DALI 2.x's own equalize augmentation still calls the deprecated experimental alias
    warnings.filterwarnings(
        "ignore", message=".*nvidia.dali.fn.experimental", category=DeprecationWarning
    )
    # torchvision's policy has a sub-policy (Equalize 0.0, Equalize 0.8) that DALI flags
    warnings.filterwarnings("ignore", message=".*is used with probability 0", category=UserWarning)
    common = dict(fill_value=AUG_FILL, interp_type=types.INTERP_LINEAR, shape=(size, size))
    ops = auto_augment_suite(name, size)
    if name == "autoaugment":
        policy = Policy(
            "torchvision ImageNet",
            num_magnitude_bins=10,
            sub_policies=[[(ops[op], p, m) for op, p, m in sub] for sub in AUTOAUGMENT_IMAGENET],
        )
        used = {op for sub in AUTOAUGMENT_IMAGENET for op, _, _ in sub}
        return aa.apply_auto_augment(policy, images, **_taken(common, [ops[o] for o in used]))
    suite = suite if suite is not None else list(ops.values())
    common = _taken(common, suite)
    if name == "trivialaugment_wide":
        return trivial_augment.apply_trivial_augment(suite, images, num_magnitude_bins=31, **common)
    return rand_augment.apply_rand_augment(
        suite, images, n=num_ops, m=magnitude, num_magnitude_bins=31, **common
    )


def _taken(kwargs: dict, augmentations) -> dict:
    """The keywords some of `augmentations` take (DALI refuses one that none takes)."""
    takes = set().union(*(inspect.signature(op.op).parameters for op in augmentations))
    return {k: v for k, v in kwargs.items() if k in takes}


def epoch_pipeline(
    paths: list[str],
    index_paths: list[str],
    *,
    checkpoint: str | None,
    batch_size: int,
    threads: int,
    device_id: int | None,
    seed: int,
    rank: int,
    world_size: int,
    train: bool,
    initial_fill: int,
    prefetch: int,
    **image,
):
    """One epoch's pipeline, defined (not built): the webdataset reader over `paths` in this
    order, this rank's contiguous part of them, then `image_graph(**image)`. Outputs: images,
    labels, each sample's source_info (shard and key, for error messages)."""
    from nvidia.dali import pipeline_def

    from distres.data.dali.index import IMAGE_EXTS

    @pipeline_def(
        batch_size=batch_size,
        num_threads=threads,
        device_id=device_id,
        seed=seed,
        enable_checkpointing=True,
        # the auto-augmentations pick each image's operator with DALI's conditionals
        enable_conditionals=train and image.get("aug", ("none",))[0] != "none",
        exec_dynamic=True,
        prefetch_queue_depth=prefetch,
    )
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=[";".join(IMAGE_EXTS), "cls"],
            missing_component_behavior="error",
            dtypes=[types.UINT8, types.UINT8],
            shard_id=rank,
            num_shards=world_size,
            random_shuffle=train,
            initial_fill=initial_fill,
            pad_last_batch=not train,
            name="reader",
        )
        where = fn.get_property(jpegs, key="source_info")
        return image_graph(jpegs, train=train, **image), labels, where

    return pipeline(checkpoint=checkpoint) if checkpoint else pipeline()


def image_graph(
    jpegs,
    *,
    decoder: str,
    color,
    train: bool,
    size: int,
    rrc_min_scale: float | None,
    crop_padding: int,
    hflip: bool,
    val_resize: int,
    aug: tuple[str, int, int] = ("none", 0, 0),
    mean: list[float],
    std: list[float],
    dtype,
):
    """Encoded images in, normalised `size` x `size` HWC images out. Training: a random
    resized crop (when rrc_min_scale is set) or a zero-padded random translation, then a
    random flip, then `aug` (data.auto_augment, ra_magnitude, ra_num_ops); validation: a
    resize of the shorter side to val_resize (0: none) and a centre crop.

    NOTE: the flip happens in crop_mirror_normalize, after the auto-augmentation (torchvision
    flips first). Every geometric operator's sign is drawn at random, so the two orders give
    the same distribution of images."""
    hints = MIXED_DECODER if decoder == "mixed" else {}
    if train and rrc_min_scale is not None:
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decoder,
            output_type=color,
            **hints,
            random_area=[rrc_min_scale, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3],
        )
        images = fn.resize(images, size=[size, size], antialias=True)
    else:
        images = fn.decoders.image(jpegs, device=decoder, output_type=color, **hints)
        if train:
            # Random translation by up to crop_padding pixels, zero-filled: the
            # padded random crop of the CIFAR recipe.
            p = crop_padding
            start = fn.cast(
                fn.random.uniform(values=[float(v) for v in range(-p, p + 1)], shape=2),
                dtype=types.INT32,
            )
            images = fn.slice(
                images,
                start=start,
                shape=[size, size],
                axis_names="HW",
                out_of_bounds_policy="pad",
                fill_values=0,
            )
        elif val_resize:
            images = fn.resize(images, resize_shorter=val_resize, antialias=True)
    if train and aug[0] != "none":
        images = auto_augment(images, aug[0], size, aug[1], aug[2])
    mirror = fn.random.coin_flip() if train and hflip else 0
    images = fn.crop_mirror_normalize(
        images,
        crop=[size, size],
        out_of_bounds_policy="pad",
        mirror=mirror,
        mean=mean,
        std=std,
        output_layout="HWC",
        dtype=dtype,
    )
    return images
