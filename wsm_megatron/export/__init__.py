"""``wsm-export``: a Megatron checkpoint (trained or merged, any TP/PP/EP layout) to a Hugging
Face transformers model folder: ``config.json``, safetensors weights, the tokenizer and
``wsm_export.json`` (provenance).

- :mod:`~wsm_megatron.export.config`: what an export is asked (:class:`ExportConfig`) and
  :class:`ExportError`, its one-line refusals.
- :mod:`~wsm_megatron.export.reader`: the checkpoint, read a box (a layer, an expert) at a time.
- :mod:`~wsm_megatron.export.hf`: which transformers architecture a model maps to, its
  ``config.json`` and tensor names.
- :mod:`~wsm_megatron.export.tokenizer`: the tokenizer as a ``PreTrainedTokenizerFast`` folder.
- :mod:`~wsm_megatron.export.writer`: safetensors shards in a folder published atomically.
- :mod:`~wsm_megatron.export.api`: :func:`export_checkpoint`, all of it.
"""

from wsm_megatron.export.config import ExportConfig, ExportError

__all__ = ["ExportConfig", "ExportError"]
