"""Accuracy of each piece of the twin, per mode, under the honest protocol.

    python bench/accuracy.py [DATA] [--target cpu_util_core_0] [--json]

DATA defaults to ../shared/seed-data/telemetry_v2 where present, else the embedded
sample. For each mode it fits the `twin` preset and prints R² / MAE / RMSE for every
base model, their plain average, the stack and the per-workload-mean baseline, plus the
meta-model chosen and the twin's training time; then the seed's own two feature sets
(v2.0, v2.3, restricted to the mode) and their RidgeCV stack, fitted on the same rows.
The table is Markdown, for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from cputwin.evaluation.protocols import evaluate_honest
from cputwin.pipeline import make_stack, sample_path
from cputwin.telemetry.ingest import load_runs

SEED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "seed-data" / "telemetry_v2"


def run(data: Path, target: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = load_runs(data)
        out = {"data": str(data), "target": target, "protocol": "honest", "modes": {}}
        for mode in ("sensor", "independent"):
            ev, stack = evaluate_honest(frame, make_stack(target, "twin", mode))
            s = ev.summary
            seed = evaluate_honest(frame, make_stack(target, "seed", mode))[0].summary
            metrics = {m: {**getattr(s, m), **{f"seed {k}": v for k, v in getattr(seed, m).items()
                                               if k in ("v2.0", "v2.3", "stack")}}
                       for m in ("r2", "mae", "rmse")}
            out["modes"][mode] = {
                **metrics,
                "meta": {"kind": s.meta.kind, "weights": s.meta.weights},
                "training_seconds": s.training_seconds,
                "rows": s.rows.to_dict(),
            }
    return out


def markdown(result: dict) -> str:
    lines = [f"Honest protocol on `{result['data']}`, target `{result['target']}`.", ""]
    for mode, m in result["modes"].items():
        lines += [f"**{mode} mode** (meta-model {m['meta']['kind']}, training "
                  f"{m['training_seconds']:.1f} s, rows train {m['rows']['train']} / test "
                  f"{m['rows']['test']})", "",
                  "| model | R² | MAE | RMSE |", "|---|---:|---:|---:|"]
        for name in m["r2"]:
            lines.append(f"| {name} | {m['r2'][name]:.4f} | {m['mae'][name]:.3f} | "
                         f"{m['rmse'][name]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path,
                        default=SEED_DATA if SEED_DATA.is_dir() else sample_path())
    parser.add_argument("--target", default="cpu_util_core_0")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.data, args.target)
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else markdown(result) + "\n")


if __name__ == "__main__":
    main()
