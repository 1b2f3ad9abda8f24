"""The accelerator seam: everything that knows torch's compiler. ``CompileSettings`` (chosen per
device), ``compile_fn``, the graph rewrites the CPU settings select, precompiled files, and the
scanned loops of the update and the rollout. The layers above take a ``CompileSettings`` as
``compiler=``; nothing here is a module-level knob.
"""
