"""Ranking: user profiles, scorers, the exact blockwise top-k and the explanations of a list."""
