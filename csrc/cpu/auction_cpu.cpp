// CPU twin of the CUDA auction (placeholder).
