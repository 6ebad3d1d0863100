"""The shard writer tool: sources, re-encoding, skipping, index files, manifest, resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from distres.data import shards as shards_mod
from distres.data.shards import ShardError, build_shard_set, parse_size, read_shard_set

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
        assert shard["sha256"] == shards_mod._sha256(path)
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
