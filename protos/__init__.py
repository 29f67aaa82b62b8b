"""The agent <-> controller wire protocol (``wattplane.v1``) and its generated Python code.

Regenerate with ``python -m protos.generate``; ``python -m protos.generate --check`` (run by the
test suite) fails when the committed generated code no longer matches ``agent.proto``.
"""
