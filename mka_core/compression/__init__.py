"""Compression: plans (inert data), the registry of planners, measured importance, merges, TransAct and healing."""
