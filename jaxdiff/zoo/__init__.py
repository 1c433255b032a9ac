"""Small models that ship with jaxdiff: weights, config and the code that trained them.

``jaxdiff.zoo.digits`` is the embedded default: a class-conditional UNet on 16x16 handwritten
digits, trained by ``python -m jaxdiff.zoo.digits.train``, with its own quality metrics.
"""

from jaxdiff.zoo import digits

__all__ = ["digits"]
