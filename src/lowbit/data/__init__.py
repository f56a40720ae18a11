"""Real models and data: fetched from package registries and the shared data folder."""
