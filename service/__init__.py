"""The posezoo BentoML service (``bentoml serve`` from the repository root)."""
