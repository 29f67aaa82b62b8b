"""Generated protocol packages, one per proto package (``wattplane.v1``)."""
