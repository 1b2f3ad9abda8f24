"""The pure core: action spaces and their masks, masked and factored distributions, advantages,
PPO's losses, the networks, a functional optimizer, normalisation, counter-based random keys and
``PPOConfig``. Pure functions over pytrees of tensors; nothing here imports the compiler seam
(``funcppo.accel``) or any other layer, and every function computes the same compiled and eager.
"""
