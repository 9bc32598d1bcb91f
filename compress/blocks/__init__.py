"""Where block i lives during a run: block stores (resident or streamed), beta-search trials, weight sources, the block runner every stage uses, block-wise forward passes, devices."""
