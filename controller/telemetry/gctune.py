"""Garbage-collector settings for a process that holds thousands of long-lived gRPC streams.

Each agent stream keeps dozens of GC-tracked objects alive for hours (call, context, tasks,
futures, node state), while every report allocates short-lived ones (read futures). With the
default thresholds (700, 10, 10) the collector runs every few hundred reports and its older
generations rescan all stream objects: measured in-process at 10,000 streams, ~6 µs of CPU per
report, more than validation. Freezing what exists after start-up and collecting the young
generation less often removes most of it; cyclic garbage is still collected, only later.
Process-wide, so only for processes that are hubs (shard workers, benchmark hubs).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000  # allocations between young collections (default 700)


def tune_for_streams() -> None:
    gc.collect()
    gc.freeze()  # objects alive now (imports, server) move to the permanent generation
    gc.set_threshold(YOUNG_THRESHOLD, 20, 100)
