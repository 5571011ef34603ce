"""runs layer (see certkit/__init__.py for the layering)."""
