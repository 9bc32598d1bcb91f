"""Text and token windows: where calibration, validation and evaluation text comes from, and how it is cut into disjoint windows."""
