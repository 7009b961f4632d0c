"""Configuration: strict specs (specs.py) and the YAML edge (loader.py, resolve.py)."""
