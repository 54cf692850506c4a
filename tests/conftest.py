"""Settings shared by every test module."""
import torch

# The tests run many small forwards. torch's default of one thread per core oversubscribes a
# small, often shared CI machine, which slowed them by up to two orders of magnitude; the native
# engines take their own n_threads and are unaffected.
torch.set_num_threads(1)
