import torch


def pytest_configure(config):
    # One process, the machine's cores, and the same settings for every provider.
    torch.set_num_threads(max(1, torch.get_num_threads()))
