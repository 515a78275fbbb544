"""API layer: pydantic models and the public contract. Imports nothing heavier than pydantic."""
