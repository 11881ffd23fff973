"""Published attention-editing methods over a stock diffusers pipeline, each a module of its own:
``p2p`` (Prompt-to-Prompt: word swaps, refinements and re-weighting by cross-attention control),
``style_aligned`` (StyleAligned: a batch that shares image 0's style through shared self-attention with AdaIN)
and ``transfer`` (Cross-Image Attention: one image's structure in another's appearance). Import from the
modules themselves, e.g. ``from attnmod.methods.p2p import EditOptions, edit``.
"""
