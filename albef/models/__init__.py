"""ALBEF models."""

from albef.models.nlvr import ALBEFNLVR, ALBEFTextAssignment, TAOutput
from albef.models.pretrain import ALBEFPretrain, PretrainOutput
from albef.models.retrieval import ALBEFRetrieval, RetrievalOutput
from albef.models.ve import ALBEFVE, ClassifierOutput

__all__ = [
    "ALBEFNLVR",
    "ALBEFVE",
    "ALBEFPretrain",
    "ALBEFRetrieval",
    "ALBEFTextAssignment",
    "ClassifierOutput",
    "PretrainOutput",
    "RetrievalOutput",
    "TAOutput",
]
