"""torch.distributed facts every stage asks (kept apart so that search need not import train)."""
import torch.distributed as dist


def rank_and_world():
    """(rank, world size): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
