"""`refpg conform`: a conformance suite that tells any PaliGemma implementation where it departs from
the reference — a fixed catalogue of tiny cases (cases.py), each exercising one rule, run through an
adapter (adapters.py), compared activation by activation with refpg's NumPy reference (run.py).

Nothing here imports transformers, torch or MLX unless their adapter is asked for.
"""
