"""`moedist plan`: per-rank memory of a layout before the job runs (see `estimate`)."""
from moedist.plan.estimate import ParamCounts, activation_bytes, count_params, estimate

__all__ = ["ParamCounts", "activation_bytes", "count_params", "estimate"]
