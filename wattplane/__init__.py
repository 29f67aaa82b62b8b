"""Wattplane: the composition root (CLI, simulator, data sets, test cluster tooling).

The layered packages are ``policies`` (pure decisions), ``controller`` (Kubernetes side),
``agents`` (node side) and ``protos`` (their shared wire format); this package wires them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wattplane")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
