"""Paired differences between methods of `tuneqdm benchmark fidelity` runs, subject by subject.

The spread between toy subjects (std ~0.13 on DINO-like) is much larger than the gaps between methods, but every
method sees the same subjects and seeds, so per-subject differences are the fair comparison:
mean difference, its standard error, and on how many subjects the first method scores higher.

    python benchmarks/fidelity_paired.py runs/fid10 runs/fid10_tuneqdm_lr2e-3 --out paired.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from itertools import combinations
from pathlib import Path

SCORES = ("dino", "clip_i", "clip_t")


def columns(folders) -> dict[str, dict[str, dict]]:
    """{label: {subject: metrics}}; the label carries the lr when one cell name appears in several folders."""
    found: dict[str, dict[str, dict]] = {}
    for folder in folders:
        for f in sorted(Path(folder).glob("cells/*/*/eval/metrics.json")):
            m = json.loads(f.read_text())
            lr = m.get("settings", {}).get("learning_rate")
            label = f.parent.parent.parent.name + ("" if lr is None else f"@{lr:g}")
            found.setdefault(label, {})[m["subject"]] = m
    return found


def paired(a: dict, b: dict) -> dict:
    subjects = sorted(set(a) & set(b))
    out = {"subjects": len(subjects)}
    for k in SCORES:
        d = [a[s][k] - b[s][k] for s in subjects]
        out[k] = {"mean": statistics.fmean(d), "se": statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None,
                  "wins": sum(v > 0 for v in d)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--against", default=None, help="only the pairs of this column (e.g. tuneqdm-w4@0.006) with each "
                                                   "other, as 'it - other'; * marks |difference| > 2 standard errors")
    args = p.parse_args()
    cols = columns(args.folders)
    if args.against is not None and args.against not in cols:
        raise SystemExit(f"--against {args.against!r}: no such column; there are {', '.join(cols)}")
    pairs = ([(args.against, y) for y in cols if y != args.against] if args.against
             else list(combinations(cols, 2)))
    result = {f"{x} - {y}": paired(cols[x], cols[y]) for x, y in pairs}
    print("| pair | subjects | " + " | ".join(f"Δ {k} (wins)" for k in SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    for name, r in result.items():
        for k in SCORES:
            r[k]["significant"] = r[k]["se"] is not None and abs(r[k]["mean"]) > 2 * r[k]["se"]
        cells = [f"{r[k]['mean']:+.3f} ± {r[k]['se']:.3f} ({r[k]['wins']}){' *' if r[k]['significant'] else ''}"
                 for k in SCORES]
        print(f"| {name} | {r['subjects']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
