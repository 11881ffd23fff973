"""Inversion of real images into a pipeline's latents: ``ddim`` (DDIM inversion, for StyleAligned references)
and ``ddpm`` (edit-friendly DDPM inversion and its exact replay, for Cross-Image Attention transfer).
"""
