"""The search benchmark's parts: protocol and compute budget, the compute-bounded study, the report."""
