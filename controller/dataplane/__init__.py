"""The Ray Serve data plane: an OpenAI-compatible router in front of a large model and its fallback.

``table`` holds the versioned routing table and the per-request decision (pure), ``standin`` the
CPU stand-in model deployments with profile-derived latency, ``serve_app`` the Ray Serve
deployments and HTTP surface, ``client`` the controller-side port that pushes tables.
"""
