"""Evaluating: the protocol's rules (splits, candidates, seen and relevant items), metrics, significance."""
