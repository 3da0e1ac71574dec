"""Training and sampling pipeline: data, models, loops."""
