"""Every numeric constant the update relies on, named once.

Literals scattered through the original agent drift apart when one copy changes; here each has
one home and one reason (docs/design.md, Named constants).
"""

# Per-head log-ratio clamp before exp: exp(20) ~ 4.9e8 stays finite in float32.
HEAD_LOG_RATIO_CLAMP = 20.0
# Joint log-ratio (sum over relevant heads) clamp: exp(30) ~ 1.1e13, still finite in float32.
JOINT_LOG_RATIO_CLAMP = 30.0

# KL early stopping fires when approx KL exceeds target_kl * KL_EARLY_STOP_FACTOR
# (OpenAI baselines / Spinning Up use 1.5).
KL_EARLY_STOP_FACTOR = 1.5

# Ratio diagnostics: a joint ratio above EXPLOSION or below COLLAPSE is reported; defined once
# so the flags and their readers agree (docs/design.md, Ratio diagnostics).
RATIO_EXPLOSION_THRESHOLD = 5.0
RATIO_COLLAPSE_THRESHOLD = 0.1

# Adam epsilon: CleanRL and the original agent both use 1e-5 for PPO rather than torch's 1e-8.
ADAM_EPS = 1e-5

# Advantage normalisation floors the standard deviation so one sample gives no NaN.
ADV_STD_FLOOR = 1e-8

# Masked logits are filled with this fraction of the dtype's most negative finite value:
# finite (no 0 * -inf NaN in entropy) and below any valid logit, however negative.
MASK_FILL_FRACTION = 0.5

# Gradient clipping divides by (global_norm + CLIP_NORM_EPS), as torch.nn.utils.clip_grad_norm_
# does, so an all-zero gradient gives a finite coefficient.
CLIP_NORM_EPS = 1e-6

# GAE solves its recursion in closed form over blocks of this many steps (O(T * block) memory
# instead of O(T^2)). A fixed size, not one derived from T, so compiling with a dynamic T works.
GAE_BLOCK_SIZE = 32

# Running normalisation (gymnasium's and SB3's RunningMeanStd): the statistics start from this
# count (not 0, so the first merge never divides by zero), and this epsilon is added to the
# variance under the square root.
STATS_INIT_COUNT = 1e-4
NORMALIZE_EPS = 1e-8
# Normalised observations are clipped to +-CLIP_OBS (SB3's VecNormalize default).
CLIP_OBS = 10.0

# Key streams of PPOAgent: fold_in(state.key, ACT_STREAM) seeds act's sampling and
# PREDICT_STREAM predict's, so evaluating never shifts what act draws (the update folds in 0, 1).
ACT_STREAM = 2
PREDICT_STREAM = 3
