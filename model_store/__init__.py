"""The model library: models.toml, where model files live, pulling and importing models."""
