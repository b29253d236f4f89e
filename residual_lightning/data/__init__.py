"""Datasets: registry of loaders, class names and prompt templates, splits, activation cache, DataModule."""
