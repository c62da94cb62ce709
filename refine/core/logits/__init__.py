"""The sparse teacher-logits store: the format (``format``), its reader and writer, the top-p-k policy
(``truncate``), the compact codec (``compact_encoder``, ``compact_decoder``) and maintenance (``tools``)."""

from refine.core.logits.format import CODECS, StoreHeader
from refine.core.logits.reader import LogitsStore
from refine.core.logits.rows import SparseRows
from refine.core.logits.tools import convert, link, retruncate
from refine.core.logits.truncate import truncate_top_p_k
from refine.core.logits.writer import LogitsWriter

__all__ = ["CODECS", "LogitsStore", "LogitsWriter", "SparseRows", "StoreHeader", "convert", "link", "retruncate",
           "truncate_top_p_k"]
