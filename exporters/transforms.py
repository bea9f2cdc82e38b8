"""Passes run on the private copy of a model that is exported, so that the deployed graph is the
inference graph whatever the caller hands in. One pass today: RepNAS branch blocks are fused back
into the conv and BN they extend (compressor.reparam.fuse), so an exported model has the slim
model's operators however it was fine-tuned."""
from compressor.reparam import fuse


def before_export(model):
    """Apply every pass to `model` (a copy that export owns) in place; returns it."""
    return fuse(model)
