"""The local test Kubernetes: real control-plane processes on loopback, kwok fake GPU nodes."""

from wattplane.testcluster.cluster import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    POOL_LABEL,
    TestCluster,
    TestClusterError,
    find_binaries,
)

__all__ = ["GPU_PRODUCT_LABEL", "GPU_RESOURCE", "POOL_LABEL", "TestCluster", "TestClusterError", "find_binaries"]
