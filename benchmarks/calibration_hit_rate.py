"""How well ``saint.calibrate`` hits its speed-up target: reads the sweep JSON files
written by ``run_dinov2_cpu.py`` and tabulates, for every calibrated variant, the
target and what it means (real-token FLOPs, or speed measured at the timing batch),
the calibration's own value (on the held-out calibration photos), the FLOPs-ideal
speed-up of the real tokens on the evaluation photos, the FLOPs ratio actually computed
and the measured speed ratio on the evaluation photos, with the error of the targeted
quantity and whether it is within +-10%.

    python benchmarks/calibration_hit_rate.py benchmarks/results/dinov2_s14_224_cpu.json [...]

Writes ``<json stem>_calibration.md`` next to each input.
"""

from __future__ import annotations

import argparse
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
        ideal = 1 / flops_fraction(model, r["tokens_per_block"], r.get("settings", {}).get("select_at", "mlp"))
        target = s["target_speedup"]
        kind = s.get("target", "flops")
        got = r["speedup"] if kind == "measured" else ideal
        err = got / target - 1
        out.append([
            r["method"], f"{target:g}x {kind}", f"{s['calibrated_speedup']:.2f}x", f"{ideal:.2f}x",
            f"{r['flops_ratio']:.2f}x", f"{r['speedup']:.2f}x", f"{100 * err:+.0f}%",
            "yes" if abs(err) <= 0.10 else "no",
        ])
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep JSON files written by run_dinov2_cpu.py")
    args = parser.parse_args(argv)
    for path in args.sweeps:
        if not path.is_file():
            parser.error(f"{path}: no such file")
        report = json.loads(path.read_text())
        size = int(report["model"].split(" at ")[1].split("px")[0])
        model = assets.default_model(size)
        head = ["variant", "target", "on calibration photos", "real-token FLOPs-ideal (eval photos)",
                "computed FLOPs ratio", "measured speed ratio (eval photos)", "error of the target", "within 10%"]
        table = rows(report, model)
        lines = [
            f"# Calibration hit rate: {report['model']}", "",
            f"- source: `{path.name}` ({report['environment']['date']}, {report['environment']['device']})",
            f"- command: `python benchmarks/calibration_hit_rate.py {path}`",
            f"- {report['settings']['images']}", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in table), "",
            "Calibration picks its settings on the held-out photos to reach the target: a `flops` target is "
            "the FLOPs-ideal speed-up of the real tokens, a `measured` target the speed-up timed on a batch "
            "of the timing batch's size (the calibration photos repeated). *error of the target* compares "
            "that same quantity on the evaluation photos with the target (for `measured`: the sweep's own "
            "timing on evaluation photos). The sweep's layout (packed or padded) is in its JSON.", "",
        ]
        out = path.with_name(path.stem + "_calibration.md")
        out.write_text("\n".join(lines))
        print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
