"""The wiring: the one place that knows every component type (schema, loading, builders)."""
