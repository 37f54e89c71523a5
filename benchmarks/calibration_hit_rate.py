"""How well ``saint.calibrate`` hits its speed-up target: reads the sweep JSON files
written by ``run_dinov2_cpu.py`` and tabulates, for every calibrated variant, the
target, the calibration's own estimate (on the held-out calibration photos), the
FLOPs-ideal speed-up of the real tokens on the evaluation photos, the FLOPs ratio
actually computed (padded per-sample batches included) and the measured speed ratio.

    python benchmarks/calibration_hit_rate.py benchmarks/results/dinov2_s14_224_cpu.json [...]

Writes ``<json stem>_calibration.md`` next to each input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from saint import assets
from saint.calibration import flops_fraction


def rows(report: dict, model) -> list[list[str]]:
    out = []
    for r in report["results"]:
        s = r["setting"]
        if "target_speedup" not in s:
            continue
        ideal = 1 / flops_fraction(model, r["tokens_per_block"])
        target = s["target_speedup"]
        out.append([
            r["method"], f"{target:g}x", f"{s['calibrated_speedup']:.2f}x", f"{ideal:.2f}x",
            f"{100 * (ideal / target - 1):+.0f}%", f"{r['flops_ratio']:.2f}x", f"{r['speedup']:.2f}x",
        ])
    return out


def main(paths: list[str]) -> int:
    for path in map(Path, paths):
        report = json.loads(path.read_text())
        size = int(report["model"].split(" at ")[1].split("px")[0])
        model = assets.default_model(size)
        head = ["variant", "target", "estimate (calibration photos)", "real-token FLOPs-ideal (eval photos)",
                "error", "computed FLOPs ratio (padding incl.)", "measured speed ratio"]
        table = rows(report, model)
        lines = [
            f"# Calibration hit rate: {report['model']}", "",
            f"- source: `{path.name}` ({report['environment']['date']}, {report['environment']['device']})",
            f"- command: `python benchmarks/calibration_hit_rate.py {path}`",
            f"- {report['settings']['images']}", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in table), "",
            "Calibration picks tau on the held-out photos to reach a FLOPs-ideal speed-up of the real "
            "(unpadded) tokens; *error* compares that quantity on the evaluation photos with the target. "
            "With `rate=\"sample\"` each image keeps its own count and batches are padded to the largest, so "
            "the FLOPs actually computed, and the measured speed, fall short of the real-token estimate; "
            "`rate=\"batch\"` keeps batches rectangular.", "",
        ]
        out = path.with_name(path.stem + "_calibration.md")
        out.write_text("\n".join(lines))
        print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
