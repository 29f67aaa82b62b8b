"""``wattplane.v1``: generated from ``agent.proto``; edit the proto, then ``python -m protos.generate``."""
