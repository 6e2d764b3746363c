"""Raster engine: windowed reads, tiling + blending, writing, alignment, (de)vectorization."""
