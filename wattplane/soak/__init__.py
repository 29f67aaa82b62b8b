"""Soak runs: long simulations and controller churn, watched for leaks and drift."""
