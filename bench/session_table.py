"""The verdict table of bench/gpu_session.sh: each target, the figure measured, pass or fail.

    python3 bench/session_table.py LOGS_DIR [--mode gpu|rehearse] [--planned S] [--budget S]

Reads the JSON each step wrote (decode.json, eager.json, compiled.json, syncs.json) and the
tests' log. A step that did not run or wrote nothing gives "missing" rather than a verdict.
Targets (one H200, ResNet-50, 224, bf16, real JPEG shards, docs/performance.md):
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TARGETS = [
    ("gpu tests (pytest -m gpu) all pass", "tests"),
    ("stage host time per 256-image batch <= 3 ms", "host_ms"),
    ("  the same with TrivialAugment-wide <= 3 ms", "host_ms_ta"),
    ("corruption check clean (9606 protocol, under load)", "clean"),
    ("real data, eager >= 4,000 img/s", "eager_real"),
    ("real data, eager >= 0.95 of synthetic", "eager_ratio"),
    ("real data, compiled >= 6,500 img/s", "compiled_real"),
    ("real data, compiled >= 0.95 of synthetic", "compiled_ratio"),
    ("trivialaugment_wide, eager >= 0.9 of synthetic", "eager_ta_ratio"),
    ("trivialaugment_wide, compiled >= 0.9 of synthetic", "compiled_ta_ratio"),
    ("no training-thread host sync in a step", "syncs"),
    ("goal: real data, compiled >= 8,000 img/s", "goal"),
]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _rate(rows: list[dict], data: str) -> float | None:
    found = [r["img_s"] for r in rows if r.get("data") == data and r.get("model") != "-"]
    return found[0] if found else None


def verdicts(logs: Path) -> dict[str, tuple[str, bool | None]]:
    """key -> (the figure as text, True/False, or None when it is missing)."""
    out: dict[str, tuple[str, bool | None]] = {}
    tests = logs / "tests.txt"
    text = tests.read_text() if tests.exists() else ""
    summary = re.findall(r"=* ?(\d+ (?:passed|failed|error|skipped)[^\n=]*)", text)
    if summary:
        line = summary[-1]
        ok = "passed" in line and "failed" not in line and "error" not in line
        out["tests"] = (line.strip(), ok)
    decode = _json(logs / "decode.json")
    for key in ("host_ms", "host_ms_ta"):
        if key in decode:
            out[key] = (f"{decode[key]:.2f} ms", decode[key] <= 3.0)
    if "victims_protocol" in decode and "under_load_differ" in decode:
        bad, rounds = decode["victims_protocol"]
        differ, images = decode["under_load_differ"]
        out["clean"] = (f"{bad}/{rounds} rounds, {differ}/{images} images", bad == 0 == differ)
    elif "stage" in decode:
        out["clean"] = ("no CUDA: not checked", None)
    for mode in ("eager", "compiled"):
        rows = _json(logs / f"{mode}.json").get("rows", [])
        synthetic, real = _rate(rows, "synthetic"), _rate(rows, "real/gpu")
        if real is None:
            real = _rate(rows, "real")
        ta = _rate(rows, "real/gpu+ta") or _rate(rows, "real+ta")
        if real is not None:
            floor = 4000 if mode == "eager" else 6500
            out[f"{mode}_real"] = (f"{real:,.0f} img/s", real >= floor)
            if mode == "compiled":
                out["goal"] = (f"{real:,.0f} img/s", real >= 8000)
        if real is not None and synthetic:
            out[f"{mode}_ratio"] = (f"{real / synthetic:.3f} ({synthetic:,.0f} synthetic)",
                                    real / synthetic >= 0.95)  # fmt: skip
        if ta is not None and synthetic:
            out[f"{mode}_ta_ratio"] = (f"{ta / synthetic:.3f} ({ta:,.0f} img/s)",
                                       ta / synthetic >= 0.9)  # fmt: skip
    syncs = _json(logs / "syncs.json")
    if syncs.get("step_syncs") is not None:
        n = syncs["step_syncs"]
        out["syncs"] = (f"{n} in {syncs['steps']} steps", n == 0)
    elif syncs:
        out["syncs"] = ("no CUDA: not counted", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", type=Path)
    ap.add_argument("--mode", default="gpu")
    ap.add_argument("--planned", type=int, default=0)
    ap.add_argument("--budget", type=int, default=0)
    args = ap.parse_args()
    found = verdicts(args.logs)
    if args.mode == "rehearse":
        print("REHEARSAL on CPU stand-ins: the figures mean nothing, the lines are the check")
    print(f"planned {args.planned} s of a {args.budget} s budget")
    width = max(len(t) for t, _ in TARGETS)
    print(f"{'target':{width}s}  {'measured':34s}  verdict")
    for text, key in TARGETS:
        figure, ok = found.get(key, ("missing (the step did not run)", None))
        verdict = "pass" if ok else "FAIL" if ok is False else "-"
        print(f"{text:{width}s}  {figure:34s}  {verdict}")


if __name__ == "__main__":
    main()
