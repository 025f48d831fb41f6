"""vlm_vpr: visual place recognition with VLM re-ranking, for kidnapped-robot recovery."""

__version__ = '0.1.0'
