"""Built-in datasets, written once as shard sets so they take the same path as ImageNet."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from distres.data.shards.manifest import MANIFEST
from distres.data.shards.read import read_shard_set
from distres.data.shards.scan import default_cache_dir
from distres.data.shards.write import write_shards

DIGITS_VERSION = "digits-v2"  # v2: DALI index files beside the shards
DIGITS_VAL_SIZE = 361  # ~20% of 1,797; a prime-ish count that no world size divides evenly
DIGITS_TRAIN_SHARDS = 6  # divisible by 1, 2, 3 and 6 ranks
DIGITS_VAL_SHARDS = 2


def digits(cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """scikit-learn's 1,797 8x8 handwritten digits as 32x32 RGB JPEG shards (train, val dirs).

    Built on first use under the cache dir. The build goes to a temporary directory that is
    renamed into place, so concurrent builders (one per rank) never see a half-written set.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / DIGITS_VERSION
    if not (target / "val" / MANIFEST).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DIGITS_VERSION}-", dir=root))
        try:
            _build_digits(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "val" / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "val"):
        read_shard_set(target / split)  # checks every listed shard is there
    return target / "train", target / "val"


def _build_digits(out: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink -> 0..255
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        index, test_size=DIGITS_VAL_SIZE, stratify=data.target, random_state=0
    )
    classes = {str(c): int(c) for c in range(10)}

    def encode(i: int) -> bytes:
        img = Image.fromarray(images[i], mode="L").resize((32, 32), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    for split, idx, n_shards in (
        ("train", train_idx, DIGITS_TRAIN_SHARDS),
        ("val", np.sort(val_idx), DIGITS_VAL_SHARDS),
    ):
        per_shard = -(-len(idx) // n_shards)
        samples = ((f"{i:05d}", encode(i), int(data.target[i])) for i in idx)
        write_shards(samples, out / split, split, classes, per_shard)
