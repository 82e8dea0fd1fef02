"""FX passes of mxfx (installed as mxfx.passes)."""
