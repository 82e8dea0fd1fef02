"""The recovery layer: weight-side math that lowers MX error without a graph: GPTQ on the MX grid
(`gptq`, with its per-site resume files in `gptq_resume`) and the block-Hadamard rotation op
(`rotation`). Imports only the numerics layer and the bottom one (errors, resume_files).
"""
