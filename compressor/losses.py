"""Losses shared by supernet training and its methods."""
import torch.nn.functional as F


def kd(student_logits, teacher_logits):
    """KL divergence from the teacher's soft output to the student's (batch mean)."""
    return F.kl_div(F.log_softmax(student_logits, -1), F.softmax(teacher_logits, -1), reduction="batchmean")
