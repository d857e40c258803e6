"""Configuration: the plant engineer's interface (schema, YAML loader, secrets)."""
