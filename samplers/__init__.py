"""Proximity graphs, random walks with restart, batch plans, and the sampler actor.

The numerical core (``graph``, ``rwr``, ``plans``, ``stats``) imports numpy, numba and faiss only;
``actor`` is the thin Ray shell around it.
"""
