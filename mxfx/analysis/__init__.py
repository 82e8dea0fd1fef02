"""The analysis layer: per-site sensitivity (`sensitivity` and its modes), mixed-precision search
(`search`, `solver`), metrics, noise floors, divergence localisation and distributed helpers.
Imports the graph layer and below.
"""
