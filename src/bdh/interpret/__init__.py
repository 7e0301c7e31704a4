"""Observers of a trained model: they read weights and activations and change nothing."""
