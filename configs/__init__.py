"""TOML presets of mxfx (installed as mxfx.configs)."""
