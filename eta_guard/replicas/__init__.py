"""Architecture-faithful tiny replicas of the reference checkpoints (random weights, offline).

Each submodule builds one replica; see :mod:`eta_guard.replicas.armorm`.
"""
