"""Timing of model calls (see :mod:`saint.timing`, which lives below calibration so that
a measured-speed calibration target can use it)."""

from ..timing import (
           PAIRINGS,
           Timing,
           median_interval,
           paired_speedup,
           synchronize,
           time_paired,
           time_round_robin,
           time_stages_round_robin,
           timed_rounds,
)

__all__ = ["PAIRINGS", "Timing", "median_interval", "paired_speedup", "synchronize", "time_paired", "time_round_robin",
           "time_stages_round_robin", "timed_rounds"]
