"""The Ray Train worker loop, models, augmentations, losses, evaluation and tracking."""
