"""Training on the pure core: ``TrainState`` and ``Batch``, the update (``make_update_fn``) with
its batch checks, gradient accumulation and data parallelism, checkpoints, and the vmapped
training and evaluation loops over functional environments (``make_train``, ``make_evaluate``).
"""
