"""Pure tensor math, free of graph plumbing (quantize, pack, error metrics)."""
