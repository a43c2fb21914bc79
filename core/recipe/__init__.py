"""The plan as data: frozen configs and CompressionPlan (plan), and plan edits applied by one pure function (edits)."""
