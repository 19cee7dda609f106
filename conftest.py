"""Root pytest configuration: applies to tests/ and to the package's doctests alike."""

import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine (or with 2 DDP
# processes) OpenMP threads spinning against each other slow them down by an order of magnitude.
torch.set_num_threads(1)
