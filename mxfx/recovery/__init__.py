"""The recovery layer: weight-side math that lowers MX error without a graph: GPTQ on the MX grid
(`gptq`) and the block-Hadamard rotation op (`rotation`). Imports only the numerics layer.
"""
