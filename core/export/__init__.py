"""Step 6, export: packed/ONNX/TorchScript/state_dict writers (formats), the output folder (outputs), report.json (report), the deployed check (deploy) and the device catalog (devices)."""
