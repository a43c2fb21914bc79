"""Shared base: errors, progress/cancel, size limits, atomic output writing (outdir), the method registry (methods) and the model value objects (model)."""
