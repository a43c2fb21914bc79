"""Step 4, compress: masks and quantization applied to a model copy (engine), with the second-order OBS/GPTQ reconstruction (second_order)."""
