"""Shared test settings.

The networks in these tests are tiny: one intra-op thread is faster than two (OpenMP's
hand-off costs more than the work), and it leaves the second core to the compiler's workers.
"""

import torch

torch.set_num_threads(1)
