"""edge/runners package."""
