"""Framework adapters, installed as ``gradwatch.adapters``.

Each adapter turns one framework's tensors into :class:`gradwatch.StepStats` and
nothing more; it imports its framework only when it is imported itself.
"""
