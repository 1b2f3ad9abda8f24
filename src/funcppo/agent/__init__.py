"""The stateful agent shell over the functional update: ``PPOAgent`` (act, observe, update,
predict, save, load), its input checks, rollout buffer and checkpoints, the gymnasium adapter
and observation encoders, ``evaluate_policy`` and the callbacks of ``learn``.
"""
