"""FX graph passes: pure graph -> graph functions (matching, rewriting, calibration observers). No kernels."""
