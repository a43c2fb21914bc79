"""Step 1, input: opening models (model_io), data sets (data, text_data), Hugging Face folders (hf), vetting of untrusted files (vetting) and the demo zoo (zoo)."""
