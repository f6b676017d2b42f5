"""Encoders behind one small interface (`base`): open_clip on torch (`torch_clip`), the
library's ONNX text tower (`onnx_text`), and the factory that picks them (`factory`).

Importing this package imports neither torch, open_clip nor onnxruntime.
"""

from clipdex.search.encoders.base import ImageTextEncoder, TextEncoder
from clipdex.search.encoders.factory import LibraryEncoders, QueryVectorCache, create_encoder

__all__ = ["ImageTextEncoder", "LibraryEncoders", "QueryVectorCache", "TextEncoder", "create_encoder"]
