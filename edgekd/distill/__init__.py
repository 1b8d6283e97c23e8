"""Knowledge distillation: losses (pure functions), the training loop, the stage."""
from .losses import hinton_kd_loss

__all__ = ["hinton_kd_loss"]
