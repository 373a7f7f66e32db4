"""Fusing representations: the parameter-free baselines, the trained models, their training and batches."""
