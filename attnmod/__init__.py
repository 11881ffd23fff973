"""attnmod."""
