"""Anchor methods we compare against (EPLB, POLCA, descheduler, greedy, thresholds).

They implement the same ``Snapshot -> Plan`` contract as our policies, so the benchmarks, the
simulator and the solver fallbacks share one implementation of each.
"""
