"""Demos: the main job (``digits``) and the SD 1.5 conversion demo (``conversion``), kept
outside the library so that nothing in jaxdiff, conversion or tuning depends on them; the
``jaxdiff demo`` and ``jaxdiff sample --model digits`` commands run them."""
