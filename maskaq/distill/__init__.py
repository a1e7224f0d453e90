"""QAT of the quantized student by distillation (KD + masked head distillation) with refreshing."""
from maskaq.distill.losses import head_distillation_loss, kd_loss
from maskaq.distill.trainer import QATConfig, QATTrainer, refresh_schedule

__all__ = ["QATConfig", "QATTrainer", "refresh_schedule", "kd_loss", "head_distillation_loss"]
