"""The I/O layer: reading and writing prepared models (`pt2`: the `.pt2` archive with mxfx's report).
"""
