"""Everything Label Studio-facing: service, label configs, results, prompt bank, store, media."""
