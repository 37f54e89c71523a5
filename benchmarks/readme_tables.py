"""Generate the result tables of the README and docs/results.md from the committed JSON,
so they cannot drift.

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in README.md or
docs/results.md (a table may appear in both) and is rebuilt from the result file named below: the speed/fidelity tables from the rows
named there (README label -> the ``label`` of a row in the result file), the
lower-resolution table from ``benchmarks/resize_baseline.py``'s outputs, the VLM tables
from every method's rows of a ``saint vlm-bench`` report (one column per metric, each
cell "50% / 25%" of the visual tokens; TTFT as minimum + spread over the rounds). Run it after re-running a benchmark:

    python benchmarks/readme_tables.py          # rewrite README.md and docs/results.md
    python benchmarks/readme_tables.py --check  # exit 1 if one is out of date (tests run this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = (README, ROOT / "docs" / "results.md")  # the files whose marked tables are generated
RESULTS = ROOT / "benchmarks" / "results"

def tome_rows(*rs: int) -> list[tuple[str, str]]:
    """ToMe at each ``r``, constant then decreasing (inflection -0.5), as table rows."""
    return [row for r in rs for row in ((f"ToMe r={r}", f"tome:r={r}"),
                                        (f"ToMe r={r}, decreasing", f"tome:r={r},inflection=-0.5"))]


# name -> (result file, first header, [(README label, result label)])
def tome_keep_norm_rows(*rs: int) -> list[tuple[str, str]]:
    """ToMe with keep_norm at each ``r``, constant then decreasing (inflection -0.5)."""
    return [(f"ToMe r={r}{', decreasing' if dec else ''}, keep_norm",
             f"tome:r={r}{',inflection=-0.5' if dec else ''},keep_norm=true") for r in rs for dec in (False, True)]


def saint_match_518_rows(*ats: str) -> list[tuple[str, str]]:
    """The recommended 518px `saint_match` (decreasing, guard 0.1, keep_norm) calibrated to
    each real-token FLOPs target."""
    return [(f"`saint_match` decreasing, guard 0.1, keep_norm, {at}x (FLOPs)",
             f"saint_match:inflection=-0.5,guard=0.1,keep_norm=True@{at}x") for at in ats]


# ToMe at 224px with keep_norm, constant r and ToMe's decreasing schedule
TOME_224_KEEP_NORM = tome_keep_norm_rows(13, 16, 19)

# the 224px runs aimed at the targets' 1.5x and 2x: ToMe near every speed, saint_match by FLOPs and measured
TARGETS_224 = [
    *tome_keep_norm_rows(13, 14, 15, 17, 18, 19),
    ("`saint_match` guard 0.1, keep_norm, 1.7x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@1.7x"),
    ("`saint_match` guard 0.1, keep_norm, 2.3x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@2.3x"),
    ("`saint_match` guard 0.1, keep_norm, 1.5x (measured)",
     "saint_match:guard=0.1,keep_norm=True,target=measured,at=1.5@1.5x"),
    ("`saint_match` guard 0.1, keep_norm, 2x (measured)",
     "saint_match:guard=0.1,keep_norm=True,target=measured,at=2@2x"),
]

# the 518px runs of saint_match before attention (keys of every token, q/v of the survivors);
# the 3.7x row was not run in every repeat
BEFORE_ATTENTION_3_7 = ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.7x (FLOPs)",
                        "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.7@3.7x")
KEYS_FIRST_518 = [
    ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
    ("ToMe r=100, decreasing, keep_norm", "tome:r=100,inflection=-0.5,keep_norm=true"),
    ("`saint_match` decreasing, guard 0.1, keep_norm, 3.3x (FLOPs)",
     "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3.3@3.3x"),
    ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.3x (FLOPs)",
     "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.3@3.3x"),
    ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.5x (FLOPs)",
     "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.5@3.5x"),
    BEFORE_ATTENTION_3_7,
    ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3x (measured)",
     "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,target=measured,at=3@3x"),
]


def before_attention_518_row(at: str) -> tuple[str, str]:
    """The 518px `saint_match` before attention calibrated to a real-token FLOPs target,
    named with ``at=`` in its spec (as the runs that compare it with the default placement)."""
    return (f"`saint_match` decreasing, guard 0.1, keep_norm, before attention, {at}x (FLOPs)",
            f"saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at={at}@{at}x")


# the default placement's 3x row of the 518px runs that set it beside selecting before attention
DEFAULT_PLACEMENT_3X_518 = ("`saint_match` decreasing, guard 0.1, keep_norm, 3x (FLOPs)",
                            "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3@3x")

# the 224px runs of the measured calibrations that aim at or above their target
BAND_224 = [
    ("ToMe r=19, keep_norm", "tome:r=19,keep_norm=true"),
    ("`saint_match` guard 0.1, keep_norm, 1.5x (measured)", "saint_match:guard=0.1,keep_norm=True,target=measured,at=1.5@1.5x"),
    ("`saint_match` guard 0.1, keep_norm, 2x (measured)", "saint_match:guard=0.1,keep_norm=True,target=measured,at=2@2x"),
]
BAND_518 = [
    ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
    ("`saint_match` decreasing, guard 0.1, keep_norm, 2x (measured)",
     "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,target=measured,at=2@2x"),
    ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3x (measured)",
     "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,target=measured,at=3@3x"),
]

FIDELITY: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "dinov2_224": ("dinov2_s14_224_cpu.json", "224px", [
        ("ToMe r=13", "tome:r=13"),
        ("ToMe r=13, decreasing (inflection -0.5)", "tome:r=13,inflection=-0.5"),
        ("ToMe r=16, decreasing", "tome:r=16,inflection=-0.5"),
        ("ToMe r=19 (ToMe's maximum here)", "tome:r=19"),
        ("SAINT (paper rule) tau=0.97, k=5", "saint:tau=0.97,k=5,gamma=10"),
        ("SAINT+ calibrated to 2x (FLOPs)", "saint_plus:at=2@2x"),
        ("`saint_match` calibrated to 1.5x (FLOPs)", "saint_match@1.5x"),
        ("`saint_match` calibrated to 2x (FLOPs)", "saint_match@2x"),
        ("`saint_match` calibrated to 2x (measured)", "saint_match:target=measured,at=2@2x"),
        ("`saint_match` calibrated to 3x (FLOPs)", "saint_match@3x"),
    ]),
    "dinov2_518": ("dinov2_s14_518_cpu.json", "518px", [
        ("ToMe r=60", "tome:r=60"),
        ("ToMe r=80", "tome:r=80"),
        ("ToMe r=80, decreasing (inflection -0.5)", "tome:r=80,inflection=-0.5"),
        ("ToMe r=100", "tome:r=100"),
        ("ToMe r=100, decreasing", "tome:r=100,inflection=-0.5"),
        ("SAINT (paper rule) tau=0.98, k=5", "saint:tau=0.98,k=5,gamma=10"),
        ("SAINT+ calibrated to 2x (FLOPs)", "saint_plus:at=2@2x"),
        ("SAINT+ calibrated to 3x (FLOPs)", "saint_plus:at=3@3x"),
        ("`saint_match` calibrated to 1.5x (FLOPs)", "saint_match@1.5x"),
        ("`saint_match` calibrated to 2x (FLOPs)", "saint_match@2x"),
        ("`saint_match` calibrated to 3x (FLOPs)", "saint_match@3x"),
    ]),
    "dinov2_224_2threads": ("dinov2_s14_224_cpu_2threads.json", "224px, 2 threads, wall clock", [
        *tome_rows(13, 16, 18, 19),
        ("SAINT+ calibrated to 1.5x (FLOPs)", "saint_plus@1.5x"),
        ("SAINT+ calibrated to 1.9x (FLOPs)", "saint_plus@1.9x"),
        ("SAINT+ calibrated to 2x (FLOPs)", "saint_plus@2x"),
        ("SAINT+ calibrated to 2.2x (FLOPs)", "saint_plus@2.2x"),
        ("SAINT+ calibrated to 2x (measured; the 2.2x-FLOPs settings)", "saint_plus:target=measured,at=2@2x"),
        ("`saint_match` calibrated to 1.5x (FLOPs)", "saint_match@1.5x"),
        ("`saint_match` calibrated to 1.9x (FLOPs)", "saint_match@1.9x"),
        ("`saint_match` calibrated to 2x (FLOPs)", "saint_match@2x"),
        ("`saint_match` calibrated to 2x (measured)", "saint_match:target=measured,at=2@2x"),
        ("`saint_match` calibrated to 2.2x (FLOPs)", "saint_match@2.2x"),
    ]),
    "dinov2_518_2threads": ("dinov2_s14_518_cpu_2threads.json", "518px, 2 threads, wall clock", [
        *tome_rows(80, 100),
        ("SAINT+ calibrated to 1.7x (FLOPs)", "saint_plus:at=1.7@1.7x"),
        ("SAINT+ calibrated to 2.2x (FLOPs)", "saint_plus:at=2.2@2.2x"),
        ("SAINT+ calibrated to 2.5x (FLOPs)", "saint_plus:at=2.5@2.5x"),
        ("`saint_match` decreasing, 2.5x (FLOPs)", "saint_match:inflection=-0.5,at=2.5@2.5x"),
        ("`saint_match` decreasing, 3x (FLOPs)", "saint_match:inflection=-0.5,at=3@3x"),
    ]),
    "dinov2_518_measured": ("dinov2_s14_518_cpu_measured.json", "518px, 2 threads, measured calibration", [
        *tome_rows(80, 100),
        ("SAINT+ calibrated to 2x (measured)", "saint_plus:target=measured,at=2@2x"),
        ("`saint_match` decreasing, 2x (measured)", "saint_match:inflection=-0.5,target=measured,at=2@2x"),
        ("`saint_match` decreasing, 3x (measured)", "saint_match:inflection=-0.5,target=measured,at=3@3x"),
    ]),
    "dinov2_518_guard": ("dinov2_s14_518_cpu_guard.json", "518px, 2 threads, class-attention guard", [
        *tome_rows(80, 100),
        ("`saint_match` decreasing, 3x (FLOPs), no guard", "saint_match:inflection=-0.5,at=3@3x"),
        ("`saint_match` decreasing, guard 0.1, 2x (FLOPs)", "saint_match:inflection=-0.5,guard=0.1@2x"),
        ("`saint_match` decreasing, guard 0.1, 3x (FLOPs)", "saint_match:inflection=-0.5,guard=0.1@3x"),
        ("`saint_match` decreasing, guard 0.1, 3x (measured)",
         "saint_match:inflection=-0.5,guard=0.1,target=measured,at=3@3x"),
    ]),
    "dinov2_518_guard2": ("dinov2_s14_518_cpu_guard2.json", "518px, 2 threads, guard, cheaper selection", [
        *tome_rows(100),
        ("`saint_match` decreasing, guard 0.1, 3x (FLOPs)", "saint_match:inflection=-0.5,guard=0.1@3x"),
        ("`saint_match` decreasing, guard 0.1, 3x (measured)",
         "saint_match:inflection=-0.5,guard=0.1,target=measured,at=3@3x"),
    ]),
    "dinov2_518_select_at": ("dinov2_s14_518_cpu_attn2.json", "518px, 2 threads, where the selection acts", [
        ("ToMe r=100", "tome:r=100"),
        ("ToMe r=100, before attention", "tome:r=100,select_at=attention"),
        ("ToMe r=100, decreasing", "tome:r=100,inflection=-0.5"),
        ("ToMe r=100, decreasing, before attention", "tome:r=100,inflection=-0.5,select_at=attention"),
        ("`saint_match` guard 0.1, 3x (FLOPs)", "saint_match:inflection=-0.5,guard=0.1@3x"),
        ("`saint_match` guard 0.1, 3.3x (FLOPs)", "saint_match:inflection=-0.5,guard=0.1@3.3x"),
        ("`saint_match` guard 0.1, before attention, 3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,select_at=attention@3x"),
        ("`saint_match` guard 0.1, before attention, 3.3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,select_at=attention@3.3x"),
    ]),
    "dinov2_518_keep_norm": ("dinov2_s14_518_cpu_keepnorm.json", "518px, 2 threads, merged tokens' norms", [
        ("ToMe r=100", "tome:r=100"),
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        ("ToMe r=100, decreasing", "tome:r=100,inflection=-0.5"),
        ("ToMe r=100, decreasing, keep_norm", "tome:r=100,inflection=-0.5,keep_norm=true"),
        ("`saint_match` decreasing, guard 0.1, 3x (FLOPs)", "saint_match:inflection=-0.5,guard=0.1,at=3@3x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, 3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3@3x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, 3.2x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3.2@3.2x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, 3.5x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3.5@3.5x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.5x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.5@3.5x"),
    ]),
    "dinov2_224_keep_norm": ("dinov2_s14_224_cpu_keepnorm.json", "224px, 2 threads, merged tokens' norms", [
        ("ToMe r=13", "tome:r=13"),
        ("ToMe r=13, keep_norm", "tome:r=13,keep_norm=true"),
        ("ToMe r=16", "tome:r=16"),
        ("ToMe r=16, keep_norm", "tome:r=16,keep_norm=true"),
        ("ToMe r=16, decreasing", "tome:r=16,inflection=-0.5"),
        ("ToMe r=16, decreasing, keep_norm", "tome:r=16,inflection=-0.5,keep_norm=true"),
        ("ToMe r=19", "tome:r=19"),
        ("ToMe r=19, keep_norm", "tome:r=19,keep_norm=true"),
        ("ToMe r=19, decreasing", "tome:r=19,inflection=-0.5"),
        ("ToMe r=19, decreasing, keep_norm", "tome:r=19,inflection=-0.5,keep_norm=true"),
        ("`saint_match` 1.5x (FLOPs)", "saint_match@1.5x"),
        ("`saint_match` keep_norm, 1.5x (FLOPs)", "saint_match:keep_norm=True@1.5x"),
        ("`saint_match` 2x (FLOPs)", "saint_match@2x"),
        ("`saint_match` keep_norm, 2x (FLOPs)", "saint_match:keep_norm=True@2x"),
        ("SAINT+ 1.5x (FLOPs)", "saint_plus@1.5x"),
        ("SAINT+ keep_norm, 1.5x (FLOPs)", "saint_plus:keep_norm=True@1.5x"),
        ("SAINT+ 2x (FLOPs)", "saint_plus@2x"),
        ("SAINT+ keep_norm, 2x (FLOPs)", "saint_plus:keep_norm=True@2x"),
    ]),
    "dinov2_518_recheck": ("dinov2_s14_518_cpu_recheck.json", "518px, 2 threads, re-check of the 3x target", [
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        ("ToMe r=100, decreasing, keep_norm", "tome:r=100,inflection=-0.5,keep_norm=true"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, 3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3@3x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, 3.3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3.3@3.3x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.3@3.3x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.6x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.6@3.6x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3x (measured)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,target=measured,at=3@3x"),
    ]),
    "dinov2_518_placement": ("dinov2_s14_518_cpu_placement.json", "518px, 2 threads, 40 photos, placement at ~3x", [
        ("ToMe r=100", "tome:r=100"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, 3.3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,at=3.3@3.3x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.3x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.3@3.3x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.45x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.45@3.45x"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3.6x (FLOPs)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,at=3.6@3.6x"),
    ]),
    "dinov2_518_keys_first": ("dinov2_s14_518_cpu_keysfirst.json",
                              "518px, 2 threads, before attention projecting q/v from the survivors",
                              KEYS_FIRST_518),
    "dinov2_518_repeat": ("dinov2_s14_518_cpu_quiet.json", "518px, 2 threads, repeated (glibc as it comes)",
                          [r for r in KEYS_FIRST_518 if r != BEFORE_ATTENTION_3_7]),
    "dinov2_518_no_mmap": ("dinov2_s14_518_cpu_nommap.json", "518px, 2 threads, glibc without mmap", KEYS_FIRST_518),
    "dinov2_224_keys_first": ("dinov2_s14_224_cpu_keysfirst.json", "224px, 2 threads, both placements with keep_norm", [
        *TOME_224_KEEP_NORM,
        ("`saint_match` guard 0.1, keep_norm, 1.5x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@1.5x"),
        ("`saint_match` guard 0.1, keep_norm, 1.9x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@1.9x"),
        ("`saint_match` guard 0.1, keep_norm, 2x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@2x"),
        ("`saint_match` guard 0.1, keep_norm, 2.1x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@2.1x"),
        ("`saint_match` guard 0.1, keep_norm, before attention, 1.5x (FLOPs)",
         "saint_match:guard=0.1,keep_norm=True,select_at=attention@1.5x"),
        ("`saint_match` guard 0.1, keep_norm, before attention, 1.9x (FLOPs)",
         "saint_match:guard=0.1,keep_norm=True,select_at=attention@1.9x"),
        ("`saint_match` guard 0.1, keep_norm, before attention, 2x (FLOPs)",
         "saint_match:guard=0.1,keep_norm=True,select_at=attention@2x"),
        ("`saint_match` guard 0.1, keep_norm, before attention, 2.1x (FLOPs)",
         "saint_match:guard=0.1,keep_norm=True,select_at=attention@2.1x"),
    ]),
    "dinov2_224_guard_repeat": ("dinov2_s14_224_cpu_guard0.json", "224px, 2 threads, with and without the guard", [
        *TOME_224_KEEP_NORM,
        ("`saint_match` keep_norm, 1.5x (FLOPs)", "saint_match:keep_norm=True@1.5x"),
        ("`saint_match` keep_norm, 1.9x (FLOPs)", "saint_match:keep_norm=True@1.9x"),
        ("`saint_match` keep_norm, 2.1x (FLOPs)", "saint_match:keep_norm=True@2.1x"),
        ("`saint_match` guard 0.1, keep_norm, 1.5x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@1.5x"),
        ("`saint_match` guard 0.1, keep_norm, 1.9x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@1.9x"),
        ("`saint_match` guard 0.1, keep_norm, 2.1x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@2.1x"),
    ]),
    "dinov2_224_targets": ("dinov2_s14_224_cpu_targets.json", "224px, 2 threads, at the targets' 1.5x and 2x",
                           TARGETS_224),
    "dinov2_224_targets_paired": ("dinov2_s14_224_cpu_targets_paired.json",
                                  "224px, 2 threads, the same, each variant timed beside the unpruned model",
                                  TARGETS_224),
    "dinov2_518_epyc_3x": ("dinov2_s14_518_cpu_epyc3x.json", "518px, 2 threads, default placement near 3x on an AMD EPYC", [
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        ("ToMe r=100, decreasing, keep_norm", "tome:r=100,inflection=-0.5,keep_norm=true"),
        *saint_match_518_rows("3", "3.2"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, 3x (measured)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,target=measured,at=3@3x"),
    ]),
    "dinov2_518_epyc_3x_repeat": ("dinov2_s14_518_cpu_epyc3x2.json", "518px, 2 threads, the same with 3.1x, repeated", [
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        *saint_match_518_rows("3", "3.1", "3.2"),
    ]),
    "dinov2_518_epyc_3x_third": ("dinov2_s14_518_cpu_epyc3x3.json", "518px, 2 threads, the same, a third run (32abb89)", [
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        *saint_match_518_rows("3", "3.1", "3.2"),
    ]),
    "dinov2_518_epyc_3x_nommap": ("dinov2_s14_518_cpu_epyc3x_nommap.json",
                                  "518px, 2 threads, the same with glibc's mmap off", [
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        *saint_match_518_rows("3", "3.1", "3.2"),
    ]),
    "dinov2_518_epyc_attn_nommap": ("dinov2_s14_518_cpu_epyc_attn_nommap.json",
                                    "518px, 2 threads, both placements on the EPYC with glibc's mmap off", [
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        DEFAULT_PLACEMENT_3X_518,
        before_attention_518_row("3.3"),
        before_attention_518_row("3.5"),
    ]),
    "dinov2_518_epyc_attn_nommap2": ("dinov2_s14_518_cpu_epyc_attn_nommap2.json",
                                     "518px, 2 threads, the same with 3.4x and the measured 3x, repeated", [
        ("ToMe r=100, keep_norm", "tome:r=100,keep_norm=true"),
        DEFAULT_PLACEMENT_3X_518,
        before_attention_518_row("3.4"),
        before_attention_518_row("3.5"),
        ("`saint_match` decreasing, guard 0.1, keep_norm, before attention, 3x (measured)",
         "saint_match:inflection=-0.5,guard=0.1,keep_norm=True,select_at=attention,target=measured,at=3@3x"),
    ]),
    "dinov2_224_targets_epyc": ("dinov2_s14_224_cpu_targets_paired2.json",
                                "224px, 2 threads, the paired run repeated on an AMD EPYC", TARGETS_224),
    "dinov2_224_targets_epyc_repeat": ("dinov2_s14_224_cpu_targets_paired3.json",
                                       "224px, 2 threads, the same, repeated on the EPYC", TARGETS_224),
    "dinov2_224_targets_epyc_third": ("dinov2_s14_224_cpu_targets_paired4.json",
                                      "224px, 2 threads, the same, a third run on the EPYC (38d5b5c)", TARGETS_224),
    "dinov2_224_targets_nommap": ("dinov2_s14_224_cpu_targets_nommap.json",
                                  "224px, 2 threads, the same on the EPYC with glibc's mmap off", TARGETS_224),
    "dinov2_224_band_nommap": ("dinov2_s14_224_cpu_band_nommap.json",
                               "224px, 2 threads, measured calibrations aiming at or above the target, mmap off",
                               BAND_224),
    "dinov2_224_band": ("dinov2_s14_224_cpu_band.json",
                        "224px, 2 threads, the same with glibc as it comes", BAND_224),
    "dinov2_518_band_nommap": ("dinov2_s14_518_cpu_band_nommap.json",
                               "518px, 2 threads, measured calibrations aiming at or above the target, mmap off",
                               BAND_518),
    "dinov2_224_band_nommap2": ("dinov2_s14_224_cpu_band_nommap2.json",
                                "224px, the same command repeated (mmap off)", BAND_224),
    "dinov2_518_band_nommap2": ("dinov2_s14_518_cpu_band_nommap2.json",
                                "518px, the same command repeated (mmap off)", BAND_518),
    "dinov2_224_targets_xeon": ("dinov2_s14_224_cpu_targets_xeon.json",
                                "224px, 2 threads, the paired targets command on an Intel Xeon (6f533ec)", TARGETS_224),
    "dinov2_224_targets_xeon2": ("dinov2_s14_224_cpu_targets_xeon2.json",
                                 "224px, the same command repeated on the Xeon", TARGETS_224),
    "dinov2_224_targets_xeon3": ("dinov2_s14_224_cpu_targets_xeon3.json",
                                 "224px, the same command a third time on the Xeon (2026-12-07)", TARGETS_224),
    "dinov2_518_band_xeon": ("dinov2_s14_518_cpu_band_xeon.json",
                             "518px, 2 threads, the band command on an Intel Xeon, glibc as it comes", BAND_518),
    "dinov2_518_band_xeon3": ("dinov2_s14_518_cpu_band_xeon3.json",
                              "518px, the band command repeated on the Xeon (389be99)", BAND_518),
    "dinov2_518_band_xeon4": ("dinov2_s14_518_cpu_band_xeon4.json",
                              "518px, the band command a third time on the Xeon (2026-12-07)", BAND_518),
    "dinov2_518_band_xeon5": ("dinov2_s14_518_cpu_band_xeon5.json",
                              "518px, the band command a fourth time on the Xeon (2026-12-07, later)", BAND_518),
    "dinov2_518_epyc": ("dinov2_s14_518_cpu_epyc.json", "518px, 2 threads, the 3x settings on an AMD EPYC",
                        KEYS_FIRST_518),
    "dinov2_518_targets": ("dinov2_s14_518_cpu_targets.json", "518px, 2 threads, at the targets' 1.5x and 2x", [
        *tome_keep_norm_rows(60, 80, 100),
        *saint_match_518_rows("1.6", "2.2"),
    ]),
    "dinov2_224_guard_keep_norm": ("dinov2_s14_224_cpu_guardnorm.json", "224px, 2 threads, guard with keep_norm", [
        *TOME_224_KEEP_NORM,
        ("`saint_match` keep_norm, 1.5x (FLOPs)", "saint_match:keep_norm=True@1.5x"),
        ("`saint_match` keep_norm, 1.9x (FLOPs)", "saint_match:keep_norm=True@1.9x"),
        ("`saint_match` keep_norm, 2x (FLOPs)", "saint_match:keep_norm=True@2x"),
        ("`saint_match` guard 0.1, keep_norm, 1.5x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@1.5x"),
        ("`saint_match` guard 0.1, keep_norm, 1.9x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@1.9x"),
        ("`saint_match` guard 0.1, keep_norm, 2x (FLOPs)", "saint_match:guard=0.1,keep_norm=True@2x"),
        ("SAINT+ keep_norm, 1.5x (FLOPs)", "saint_plus:keep_norm=True@1.5x"),
        ("SAINT+ keep_norm, 1.9x (FLOPs)", "saint_plus:keep_norm=True@1.9x"),
        ("SAINT+ keep_norm, 2x (FLOPs)", "saint_plus:keep_norm=True@2x"),
    ]),
    "dinov2_224_select_at": ("dinov2_s14_224_cpu_attn.json", "224px, 2 threads, where the selection acts", [
        ("ToMe r=13", "tome:r=13"),
        ("ToMe r=13, before attention", "tome:r=13,select_at=attention"),
        ("ToMe r=19", "tome:r=19"),
        ("ToMe r=19, before attention", "tome:r=19,select_at=attention"),
        ("`saint_match` guard 0.1, 1.5x (FLOPs)", "saint_match:guard=0.1@1.5x"),
        ("`saint_match` guard 0.1, 2x (FLOPs)", "saint_match:guard=0.1@2x"),
        ("`saint_match` guard 0.1, before attention, 1.5x (FLOPs)", "saint_match:guard=0.1,select_at=attention@1.5x"),
        ("`saint_match` guard 0.1, before attention, 2x (FLOPs)", "saint_match:guard=0.1,select_at=attention@2x"),
    ]),
    "dinov2_224_guard": ("dinov2_s14_224_cpu_guard.json", "224px, 2 threads, class-attention guard", [
        *tome_rows(13, 16, 19),
        ("`saint_match` calibrated to 1.5x (FLOPs)", "saint_match@1.5x"),
        ("`saint_match` calibrated to 2x (FLOPs)", "saint_match@2x"),
        ("`saint_match` guard 0.1, 1.5x (FLOPs)", "saint_match:guard=0.1@1.5x"),
        ("`saint_match` guard 0.1, 2x (FLOPs)", "saint_match:guard=0.1@2x"),
    ]),
    "dinov2_224_schedule": ("dinov2_s14_224_cpu_schedule.json", "224px, schedule run", [
        *tome_rows(13, 19),
        ("`saint_match` calibrated to 1.5x (FLOPs)", "saint_match@1.5x"),
        ("`saint_match` calibrated to 2x (FLOPs)", "saint_match@2x"),
        ("`saint_match` decreasing, 1.5x (FLOPs)", "saint_match:inflection=-0.5@1.5x"),
        ("`saint_match` decreasing, 2x (FLOPs)", "saint_match:inflection=-0.5@2x"),
        ("`saint_match` decreasing, 2x (measured)", "saint_match:inflection=-0.5,target=measured,at=2@2x"),
    ]),
    "dinov2_518_schedule": ("dinov2_s14_518_cpu_schedule.json", "518px, schedule run", [
        *tome_rows(80, 100),
        ("`saint_match` decreasing, 2x (FLOPs)", "saint_match:inflection=-0.5@2x"),
        ("`saint_match` decreasing, 2.5x (FLOPs)", "saint_match:inflection=-0.5@2.5x"),
        ("`saint_match` decreasing, 3x (FLOPs)", "saint_match:inflection=-0.5@3x"),
    ]),
}


# name -> (vlm-bench result file, first header, size of the reference model the FLOPs column is at)
VLM: dict[str, tuple[str, str, str]] = {
    "vlm_llava": ("vlm_scaled_cpu_fp32.json", "LLaVA-1.5-7B scaled, 576 visual tokens", "7B"),
    "vlm_qwen": ("vlm_qwen_scaled_cpu_fp32.json", "Qwen2.5-VL-7B scaled, 256 visual tokens", "7B"),
    "vlm_qwen3": ("vlm_qwen3_scaled_cpu_fp32.json", "Qwen3-VL-8B scaled, 256 visual tokens", "8B"),
}
VLM_ROWS = [("unpruned", "unpruned"), ("SAINT `vit`", "vit"), ("SAINT `hybrid`", "hybrid"), ("SAINT `llm`", "llm"),
            ("FastV", "fastv"), ("random", "random"), ("pooling", "pool")]
VLM_COLUMNS = [("TTFT ms (+ spread)", lambda r: f"{r['ttft']['ms_min']:.0f} (+{r['ttft']['ms_spread']:.0f})"),
               ("TTFT speed-up", lambda r: f"{r['ttft_speedup']:.2f}x"),
               ("prefill FLOPs speed-up at {ref}", lambda r: f"{r['analytic_ref_speedup']:.2f}x"),
               ("decode ms/token", lambda r: f"{r['decode_per_token']['ms_min']:.1f}"),
               ("KV cache MB", lambda r: f"{r['kv_cache_mb']:.1f}")]


# tables that compare at the same FLOPs, so show them
WITH_FLOPS = {"dinov2_518_select_at", "dinov2_224_select_at", "dinov2_518_keep_norm", "dinov2_224_keep_norm",
              "dinov2_518_recheck", "dinov2_518_placement", "dinov2_224_guard_keep_norm",
              "dinov2_518_keys_first", "dinov2_224_keys_first",
              "dinov2_518_repeat", "dinov2_518_no_mmap", "dinov2_224_guard_repeat", "dinov2_224_targets",
              "dinov2_224_targets_paired", "dinov2_518_targets", "dinov2_224_targets_epyc", "dinov2_518_epyc",
              "dinov2_518_epyc_3x", "dinov2_518_epyc_3x_repeat", "dinov2_518_epyc_3x_third",
              "dinov2_224_targets_epyc_repeat", "dinov2_224_targets_epyc_third", "dinov2_224_targets_nommap",
              "dinov2_518_epyc_3x_nommap", "dinov2_518_epyc_attn_nommap", "dinov2_518_epyc_attn_nommap2",
              "dinov2_224_band_nommap", "dinov2_518_band_nommap",
              "dinov2_224_band", "dinov2_224_band_nommap2", "dinov2_518_band_nommap2",
              "dinov2_224_targets_xeon", "dinov2_224_targets_xeon2", "dinov2_224_targets_xeon3", "dinov2_518_band_xeon",
              "dinov2_518_band_xeon3", "dinov2_518_band_xeon4", "dinov2_518_band_xeon5"}


def fidelity_table(name: str) -> str:
    """A speed / fidelity table from the rows of a sweep result file (with the FLOPs ratio
    for the tables in ``WITH_FLOPS``)."""
    file, first, rows = FIDELITY[name]
    flops = name in WITH_FLOPS
    results = {r["label"]: r for r in json.loads((RESULTS / file).read_text())["results"]}
    lines = [f"| {first} |{' FLOPs ratio |' if flops else ''} speed | centered cos | retrieval@1 |",
             "|---|---|---|---|" + ("---|" if flops else "")]
    for label, key in rows:
        if key not in results:
            raise KeyError(f"{file} has no row {key!r} (for the README's {label!r})")
        r = results[key]
        ratio = f" {r['flops_ratio']:.2f}x |" if flops else ""
        lines.append(f"| {label} |{ratio} {r['speedup']:.2f}x | {r['centered_cosine']:.3f} | {r['retrieval_at_1']:.3f} |")
    return "\n".join(lines)


def vlm_table(name: str) -> str:
    """Each method of a vlm-bench report at its budgets: one column per metric, cells
    "first budget / second budget" (the unpruned row has one value)."""
    file, first, ref = VLM[name]
    report = json.loads((RESULTS / file).read_text())
    budgets = report["settings"]["budgets"]
    n = report["settings"]["image_tokens"]
    by = {(r["method"], r["budget"]): r for r in report["variants"]}
    shares = " / ".join(f"{100 * b / n:.0f}%" for b in budgets)
    lines = [f"| {first} ({shares}) | " + " | ".join(h.format(ref=ref) for h, _ in VLM_COLUMNS) + " |",
             "|---" * (len(VLM_COLUMNS) + 1) + "|"]
    for label, method in VLM_ROWS:
        keys = [(method, None)] if method == "unpruned" else [(method, b) for b in budgets]
        if not any(k in by for k in keys):
            raise KeyError(f"{file} has no {method} row (for the README's {label!r})")
        cells = [" / ".join(get(by[k]) if k in by else "-" for k in keys) for _, get in VLM_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# name -> [(result file of benchmarks/resize_baseline.py, the input sizes shown)]
RESIZE: dict[str, list[tuple[str, tuple[int, ...]]]] = {
    "dinov2_resize": [("dinov2_s14_518_cpu_resize.json", (448, 406, 350, 308)),
                      ("dinov2_s14_224_cpu_resize.json", (196, 168, 154))],
}


def resize_table(name: str) -> str:
    """The lower-resolution baseline: each shown input size against its full size."""
    lines = ["| input size | FLOPs ratio | speed | centered cos | retrieval@1 |", "|---|---|---|---|---|"]
    for file, sizes in RESIZE[name]:
        report = json.loads((RESULTS / file).read_text())
        by = {r["size"]: r for r in report["results"]}
        for size in sizes:
            if size not in by:
                raise KeyError(f"{file} has no {size}px row")
            r = by[size]
            lines.append(f"| {size}px (of {report['settings']['size']}) | {r['flops_ratio']:.2f}x | {r['speedup']:.2f}x "
                         f"| {r['centered_cosine']:.3f} | {r['retrieval_at_1']:.3f} |")
    return "\n".join(lines)


TABLES = {**dict.fromkeys(FIDELITY, fidelity_table), **dict.fromkeys(VLM, vlm_table),
          **dict.fromkeys(RESIZE, resize_table)}


def table(name: str) -> str:
    """The markdown table ``name`` from its result file."""
    return TABLES[name](name)


def render(text: str) -> str:
    """``text`` with every marked table rebuilt."""

    def fill(m: re.Match[str]) -> str:
        return f"{m.group(1)}\n{table(m.group(2))}\n{m.group(3)}"

    # the body is optional: a new, still empty table must not swallow the text up to the next one's end
    return re.sub(r"(<!-- table:(\w+) -->)\n(?:.*?\n)??(<!-- /table -->)", fill, text, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if a file differs from the generated tables")
    args = p.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text)
        if new == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(new)
    if args.check and stale:
        print(f"result tables out of date in {', '.join(map(str, stale))}: run python benchmarks/readme_tables.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
