"""Recovery after compression: fine-tuning and distillation from the original (training) and ensembles of runs (ensemble)."""
