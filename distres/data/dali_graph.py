"""The per-image part of the DALI graph: decode, augment, normalise (`data.backend=dali`).

`DaliLoader` builds the reader and calls `image_graph` inside its `pipeline_def`; the same
operators run on the GPU ("mixed" decoding: nvJPEG) or on the CPU (`device_id=None`).
Augmentation ends in `crop_mirror_normalize` with HWC layout, so the NCHW view the model gets
has channels_last strides with no extra copy. Every random operator draws from the
pipeline's seed, which DALI's pipeline checkpoint restores: a mid-epoch resume is exact.
"""

from __future__ import annotations

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
    mean: list[float],
    std: list[float],
    dtype,
):
    """Encoded images in, normalised `size` x `size` HWC images out. Training: a random
    resized crop (when rrc_min_scale is set) or a zero-padded random translation, then a
    random flip; validation: a resize of the shorter side to val_resize (0: none) and a centre
    crop."""
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
