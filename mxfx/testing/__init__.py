"""Small models (`models`) and offline pretrained packages (`pretrained`) shared by the tests,
examples and benchmarks. Not imported by `import mxfx`.
"""
