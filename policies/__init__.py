"""Pure policies: ``Snapshot -> Plan`` functions with no I/O, no clock and no randomness.

Everything a policy needs arrives in the :class:`policies.snapshot.Snapshot` (including ``now``);
everything it decides leaves in a :class:`policies.plan.Plan`. The controller and the simulator
call the same functions, so a decision can be replayed from a snapshot file.
"""
