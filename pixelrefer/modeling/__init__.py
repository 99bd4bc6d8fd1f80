"""Model code: object tokenizer (SAOT), Object-Centric Infusion, and the PixelRefer models."""

from pixelrefer.modeling.infusion import ObjectCentricInfusion
from pixelrefer.modeling.object_tokenizer import MaskPooling, ObjectTokenizer
from pixelrefer.modeling.pixelrefer import (
    ObjectFeatures,
    PixelReferForConditionalGeneration,
    PixelReferModel,
)

__all__ = [
    "MaskPooling",
    "ObjectCentricInfusion",
    "ObjectFeatures",
    "ObjectTokenizer",
    "PixelReferForConditionalGeneration",
    "PixelReferModel",
]
