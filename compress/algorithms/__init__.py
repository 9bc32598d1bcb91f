"""Pure tensor math, no model and no files: per-block allocation, pruning masks, the OBS solver, integer grids and llama.cpp block formats, statistics, the beta search."""
