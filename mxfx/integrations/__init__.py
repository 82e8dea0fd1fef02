"""Integrations with other tools (generation, evaluation harnesses). Imports anything below.
"""
