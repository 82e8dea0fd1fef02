"""The graph layer: configs (`config`), `torch.export` (`export`), the typed `Site` record
(`sites`), `prepare` (which runs the FX passes of `mxfx.passes`), the NaN/Inf checks (`checks`)
and the summary/graph views (`inspect`). `config`, `export` and `sites` sit below the passes;
`prepare`, `checks` and `inspect` above them.
"""
