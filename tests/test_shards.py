"""The shard writer tool: sources, re-encoding, skipping, index files, manifest, resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from commands import run_cli
from PIL import Image

from distres.data.shards import write as shards_mod
from distres.data.shards.manifest import ShardError
from distres.data.shards.read import read_shard_set
from distres.data.shards.scan import sha256_file
from distres.data.shards.write import build_shard_set, parse_size
from distres.data.spec import LoaderSpec

CLASSES = ["cat dog", "ñandú", "Zebra 2"]  # a space, non-ASCII, a digit and a capital


def make_image_folder(root: Path, per_class: int = 12) -> int:
    """Mixed formats: RGB JPEG, RGBA PNG, CMYK JPEG, grayscale JPEG, palette PNG; plus one
    unreadable file. Returns the number of readable images."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8"))
            kind = i % 5
            if kind == 0:
                img.save(root / c / f"{i}.jpg", quality=90)
            elif kind == 1:
                img.convert("RGBA").save(root / c / f"{i}.png")
            elif kind == 2:
                img.convert("CMYK").save(root / c / f"{i} cmyk.jpg")
            elif kind == 3:
                img.convert("L").save(root / c / f"{i}.jpeg")
            else:
                img.convert("P").save(root / c / f"{i}.png")
    (root / CLASSES[2] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / CLASSES[0] / "notes.txt").write_text("not an image: ignored")
    return per_class * len(CLASSES)


def read_samples(shard_dir: Path) -> list[dict]:
    out = []
    for url in read_shard_set(shard_dir).urls:
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".", 1)[0] for n in members}):
            out.append({ext: members[f"{key}.{ext}"] for ext in ("jpg", "cls", "json")})
    return out


def test_image_folder_gives_the_right_manifest(tmp_path):
    n = make_image_folder(tmp_path / "src")
    out = tmp_path / "train"
    manifest = build_shard_set(
        tmp_path / "src", out, parse_size("100KB"), prefix="train", workers=2, progress=False
    )
    assert manifest["classes"] == {name: i for i, name in enumerate(sorted(CLASSES))}
    assert manifest["num_samples"] == n
    assert manifest["num_skipped"] == 1
    assert manifest["skipped"][0]["path"].endswith("broken.jpg")
    assert len(manifest["shards"]) > 1
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert shard["bytes"] == path.stat().st_size <= 100_000
        assert shard["sha256"] == sha256_file(path)
        assert (out / shard["index"]).is_file()  # DALI's index, beside the shard
        lines = (out / shard["index"]).read_text().splitlines()
        assert len(lines) == shard["samples"] + 1  # DALI's header line + one per sample
    samples = read_samples(out)
    assert len(samples) == n
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert (img.format, img.mode) == ("JPEG", "RGB")
        meta = json.loads(s["json"])
        assert int(s["cls"]) == manifest["classes"][meta["class"]]
        assert meta["path"].split("/")[0] == meta["class"]
    # Every source class is there in full.
    counts = {}
    for s in samples:
        counts[json.loads(s["json"])["class"]] = counts.get(json.loads(s["json"])["class"], 0) + 1
    assert counts == {c: n // len(CLASSES) for c in CLASSES}


def test_rgb_jpegs_are_stored_byte_for_byte(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "src" / "a" / "x.jpg", quality=77)
    build_shard_set(tmp_path / "src", tmp_path / "out", 10**6, workers=1, progress=False)
    (sample,) = read_samples(tmp_path / "out")
    assert sample["jpg"] == (tmp_path / "src" / "a" / "x.jpg").read_bytes()


@pytest.mark.parametrize("sep,ext", [(",", "csv"), ("\t", "tsv")])
def test_csv_and_tsv_lists(tmp_path, sep, ext):
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"img{i}.png")
    rows = ["path" + sep + "label"] + [
        f"img{i}.png{sep}{'bird' if i % 2 else 'ant'}" for i in range(4)
    ]
    (tmp_path / f"list.{ext}").write_text("\n".join(rows) + "\n")
    manifest = build_shard_set(
        tmp_path / f"list.{ext}", tmp_path / "out", 10**6, workers=1, progress=False
    )
    assert manifest["classes"] == {"ant": 0, "bird": 1}
    assert [int(s["cls"]) for s in read_samples(tmp_path / "out")] == [0, 1, 0, 1]


def test_integer_labels_keep_their_values(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "l.csv").write_text("0.png,7\n1.png,0\n2.png,3\n")
    manifest = build_shard_set(
        tmp_path / "l.csv", tmp_path / "out", 10**6, workers=1, progress=False
    )
    assert len(manifest["classes"]) == 8
    assert [int(s["cls"]) for s in read_samples(tmp_path / "out")] == [7, 0, 3]


def test_interrupted_build_resumes_without_duplicates(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "src")
    reference = build_shard_set(
        tmp_path / "src", tmp_path / "ref", 60_000, workers=1, progress=False
    )
    real = shards_mod._encode_item

    def dies_at_item_25(args):
        if args[0] == 25:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-shard
        return real(args)

    out = tmp_path / "out"
    monkeypatch.setattr(shards_mod, "_encode_item", dies_at_item_25)
    with pytest.raises(KeyboardInterrupt):
        build_shard_set(tmp_path / "src", out, 60_000, workers=1, progress=False)
    done = sorted(p.name for p in out.glob("*.tar"))
    assert done and not (out / "manifest.json").exists()
    first_mtime = (out / done[0]).stat().st_mtime_ns
    monkeypatch.setattr(shards_mod, "_encode_item", real)

    resumed = build_shard_set(tmp_path / "src", out, 60_000, workers=1, progress=False)
    assert (out / done[0]).stat().st_mtime_ns == first_mtime  # kept, not rewritten
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["num_samples"] == reference["num_samples"]
    assert resumed["skipped"] == reference["skipped"]
    keys = [json.loads(s["json"])["path"] for s in read_samples(out)]
    assert len(keys) == len(set(keys)) == reference["num_samples"]
    assert not list(out.glob(".*progress*")) and not list(out.glob("*.tmp"))


def test_a_complete_set_is_not_overwritten(tmp_path):
    make_image_folder(tmp_path / "src", per_class=2)
    build_shard_set(tmp_path / "src", tmp_path / "out", 10**6, prefix="val", progress=False)
    with pytest.raises(ShardError, match="already there"):
        build_shard_set(tmp_path / "src", tmp_path / "out", 10**6, prefix="val", progress=False)


def test_parse_size():
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("100k") == 100_000
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="shard-size"):
        parse_size("lots")


@pytest.mark.slow
def test_cli_writes_a_set_the_loader_reads(tmp_path):
    n = make_image_folder(tmp_path / "src", per_class=4)
    proc = run_cli(
        "--src",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "val"),
        "--shard-size",
        "50KB",
        module="distres.data.shards",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{n} samples in" in proc.stdout and "1 skipped" in proc.stdout
    assert "broken.jpg" in proc.stderr and "RuntimeWarning" not in proc.stderr
    assert read_shard_set(tmp_path / "val").num_samples == n
    bad = run_cli(
        "--src",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "x"),
        module="distres.data.shards",
        timeout=60,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(src / "a" / "deep.png")  # a 16-bit grayscale PNG
    assert Image.open(src / "a" / "deep.png").mode.startswith("I")
    build_shard_set(src, tmp_path / "out", 1 << 20, progress=False)
    (sample,) = read_samples(tmp_path / "out")
    pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), dtype=np.float64)
    want = ramp / 257.0
    assert abs(pixels.mean() - want.mean()) < 3  # scaled: mid-grey on average, not white
    assert pixels[0, :8].mean() < 10 and pixels[-1, -8:].mean() > 245


def test_empty_class_folder_is_refused_unless_allowed(tmp_path):
    src = tmp_path / "src"
    for name in ("a", "b-empty", "c"):
        (src / name).mkdir(parents=True)
    for name in ("a", "c"):
        Image.new("RGB", (16, 16)).save(src / name / "x.jpg")
    proc = run_cli(
        "--src", str(src), "--out", str(tmp_path / "out"), module="distres.data.shards", timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "b-empty: class folder without image files (class 1" in proc.stderr
    assert "--allow-empty-classes" in proc.stderr
    manifest = build_shard_set(
        src, tmp_path / "out", 1 << 20, progress=False, allow_empty_classes=True
    )
    assert manifest["classes"] == {"a": 0, "b-empty": 1, "c": 2}


def test_skip_messages_name_the_file_and_repeat_exactly(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(src / "a" / "good.jpg")
    (src / "a" / "bad.png").write_bytes(b"not an image at all")
    first = build_shard_set(src, tmp_path / "one", 1 << 20, progress=False)
    second = build_shard_set(src, tmp_path / "two", 1 << 20, progress=False)
    (skip,) = first["skipped"]
    assert str(src / "a" / "bad.png") in skip["error"] and "0x" not in skip["error"]
    assert first["skipped"] == second["skipped"]


def test_index_command_indexes_foreign_shards_in_place(tmp_path):
    import webdataset as wds

    from distres.data.shards.scan import sha256_file

    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"foreign-{s:06d}.tar")) as w:
            for i in range(5):
                w.write({"__key__": f"s{s}k{i}", "jpg": _jpeg(), "cls": str(i + s).encode()})
    before = {p.name: sha256_file(p) for p in tmp_path.glob("*.tar")}
    proc = run_cli(
        "index",
        str(tmp_path / "foreign-{000000..000001}.tar"),
        module="distres.data.shards",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "10 samples in 2 shards, 6 classes" in proc.stdout
    assert {p.name: sha256_file(p) for p in tmp_path.glob("*.tar")} == before  # not rewritten
    shards = read_shard_set(tmp_path)  # now through the manifest
    assert shards.counts == (5, 5) and shards.num_classes == 6
    assert all(s == before[Path(u).name] for s, u in zip(shards.sha256, shards.urls, strict=True))
    again = run_cli("index", str(tmp_path), module="distres.data.shards", timeout=120)
    assert again.returncode == 2 and "already there" in again.stderr


def test_checksums_are_verified_on_first_read(tmp_path):
    import torch

    from distres.data.shards.write import write_shards
    from distres.data.torch.loader import ShardLoader
    from distres.data.torch.transforms import val_transform

    write_shards([(f"k{i}", _jpeg(), i % 2) for i in range(8)], tmp_path, "x", {"a": 0, "b": 1}, 4)
    shard = tmp_path / "x-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, one byte flipped: only the checksum can tell
    shard.write_bytes(bytes(data))

    def loader(verify):
        return ShardLoader(
            LoaderSpec(
                read_shard_set(tmp_path),
                train=False,
                batch_size=4,
                transform=val_transform(16, 0),
                mean=[0.5],
                std=[0.5],
                num_classes=2,
                verify=verify,
                device=torch.device("cpu"),
            )
        )

    with pytest.raises(ShardError, match=r"x-000001\.tar: sha256 differs from its manifest"):
        list(loader(True))
    list(loader(False))  # without the check the damage goes unseen here


def _jpeg(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def test_max_side_shrinks_large_images_and_progressive_jpegs_become_baseline(tmp_path):
    """--max-side re-encodes only images whose longer side exceeds it (aspect kept);
    progressive JPEGs are re-encoded as baseline (GPU decoders' fast path); a small baseline
    RGB JPEG stays byte for byte."""
    rng = np.random.default_rng(1)
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)

    def save(name: str, size: tuple[int, int], **kw) -> bytes:
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / name, format="JPEG", quality=90, **kw)
        return (src / name).read_bytes()

    small = save("1-small.jpg", (120, 80))
    save("2-large.jpg", (640, 300))
    save("3-tall.jpg", (90, 500))
    save("4-progressive.jpg", (100, 100), progressive=True)
    r = run_cli(
        "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--max-side", "256",
        "--workers", "1", module="distres.data.shards",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shard_set = read_shard_set(tmp_path / "out")
    images = {}
    with tarfile.open(shard_set.urls[0]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".jpg"):
                images[member.name] = tar.extractfile(member).read()
    data = [images[k] for k in sorted(images)]
    opened = [Image.open(io.BytesIO(d)) for d in data]
    assert data[0] == small
    assert opened[1].size == (256, 120)  # 640x300 -> longer side 256, aspect kept
    assert opened[2].size == (46, 256)
    assert opened[3].size == (100, 100)
    assert not any(im.info.get("progressive") or im.info.get("progression") for im in opened)
    r = run_cli(
        "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--max-side", "-1",
        module="distres.data.shards",
    )  # fmt: skip
    assert r.returncode == 2 and "--max-side -1" in r.stderr


_SCAN_RANK = """
import json, os, pathlib, sys, time
from distres.data.shards import scan
from distres.data.shards.read import read_shard_set
done = []
once = scan._scan_once
def counted(tar, *a):
    done.append(str(tar))
    time.sleep(0.3)  # a scan that takes time, as a real tar's does
    return once(tar, *a)
scan._scan_once = counted
# both ranks start together (the import time of each differs)
here = pathlib.Path(sys.argv[1])
(here / f"ready-{os.environ['LOCAL_RANK']}").touch()
while not all((here / f"ready-{r}").exists() for r in (0, 1)):
    time.sleep(0.01)
s = read_shard_set(sys.argv[1])
print(json.dumps({"scanned": done, "samples": s.num_samples, "counts": list(s.counts)}))
"""


def test_the_ranks_of_a_node_scan_a_foreign_set_together(tmp_path):
    """Two ranks of a node (LOCAL_RANK 0 and 1 of 2), started together on 8 foreign tars with
    an empty cache: every tar is scanned exactly once over both, each rank scans some, and
    both see the same counts. A lock left by a rank killed mid-scan blocks nothing."""
    import fcntl
    import os
    import subprocess
    import sys

    import webdataset as wds
    from commands import REPO

    for s in range(8):
        with wds.TarWriter(str(tmp_path / f"t-{s}.tar")) as w:
            for i in range(50 + s):
                w.write({"__key__": f"{s}-{i:03d}", "jpg": b"x" * 64, "cls": str(i % 3)})
    env = {**os.environ, "DISTRES_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
           "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCAN_RANK, str(tmp_path)],
            text=True,
            stdout=subprocess.PIPE,
            env={**env, "LOCAL_RANK": str(r), "RANK": str(r)},
        )
        for r in (0, 1)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    scanned = [t for o in outs for t in o["scanned"]]
    assert sorted(scanned) == sorted(str(tmp_path / f"t-{s}.tar") for s in range(8))
    assert all(o["scanned"] for o in outs), outs  # both ranks did part of the work
    assert outs[0]["counts"] == outs[1]["counts"] == [50 + s for s in range(8)]
    # a scan's lock held by a process that then dies: the kernel drops it, the next scan runs
    from distres.data.shards.scan import _cache_stem, scan_tar

    (tmp_path / "new.tar").write_bytes((tmp_path / "t-0.tar").read_bytes())
    env_cache = os.environ.get("DISTRES_CACHE")
    os.environ["DISTRES_CACHE"] = str(tmp_path / "cache")
    try:
        lock = _cache_stem(tmp_path / "new.tar").with_suffix(".lock")
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)")
            , str(lock)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert holder.stdout.readline().strip() == "held"
        with open(lock) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it is held
        holder.kill()
        holder.wait(30)
        assert scan_tar(tmp_path / "new.tar")["samples"] == 50
    finally:
        if env_cache is None:
            os.environ.pop("DISTRES_CACHE")
        else:
            os.environ["DISTRES_CACHE"] = env_cache
