"""``wattplane bench NAME``: our solver and the anchor's method on the same input, one run."""
