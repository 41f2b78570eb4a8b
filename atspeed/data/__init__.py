"""Loaders, splits, prompts and the DataModule: everything between files on disk and token batches."""
