"""``python -m funcppo train``: argument parsing and presets (``args``), the training runs on
functional and gymnasium environments (``train``, ``gym_train``), and the reports and outputs
(``report``). ``main`` is the entry point.
"""
