"""Planning: per-layer sensitivity scans (sensitivity) and the budget solver that turns them into a plan (solver)."""
