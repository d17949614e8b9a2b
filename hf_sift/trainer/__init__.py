"""Sign-fixed finetuning on the Hugging Face Trainer, for one task or hundreds."""

from .recipe import Recipe
from .sift_config import SIFTConfig
from .sift_trainer import SIFTTrainer
from .sign_constraint import SignConstraint
from .train_tasks import train_task, train_tasks


__all__ = ["Recipe", "SIFTConfig", "SIFTTrainer", "SignConstraint", "train_task", "train_tasks"]
