"""ALBEF models."""

from albef.models.pretrain import ALBEFPretrain, PretrainOutput
from albef.models.retrieval import ALBEFRetrieval, RetrievalOutput

__all__ = ["ALBEFPretrain", "ALBEFRetrieval", "PretrainOutput", "RetrievalOutput"]
