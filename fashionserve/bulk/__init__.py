"""Bulk daily tagging: ``fashionserve batch run|status`` (issue 12, being written)."""
