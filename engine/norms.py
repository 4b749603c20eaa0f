"""Loss normalisations as constant factors per layer and size (``--gram-norm``,
``--content-norm``). Plain arithmetic, no torch: the settings validate against these names.

Each normalisation is the engine's default per-layer term (a mean; engine/losses.py) times
a constant that depends only on the layer's channels C and positions M = H * W, so the loop
keeps one Gram kernel and its float32 range. With G = F F^T unnormalised:

    chw      mean((G/(C*M) - A/(C*M))^2)      factor 1        (PyTorch tutorial; the default)
    hw       mean((G/M - A/M)^2)              factor C^2      (Gatys' PyTorch code)
    4n2m2    sum((G - A)^2) / (4 C^2 M^2)     factor C^2/4    (Gatys et al., eq. 4)
    raw-chw  mean((G - A)^2) / (C*M)          factor C*M      (Udacity course notebook)
    raw      mean((G - A)^2)                  factor C^2 M^2  (plain blog loops)

and each content term is ``mean`` (factor 1) or ``half-sum``, 1/2 sum((F - P)^2) (factor
C*M/2, Gatys et al., eq. 1). The factors are computed once per size (engine/targets.py)
and folded into the layer weights.
"""

from __future__ import annotations


def _style_factors(c: int, m: int) -> dict[str, float]:
    return {"chw": 1.0, "hw": float(c * c), "4n2m2": c * c / 4.0, "raw-chw": float(c * m),
            "raw": float(c * c) * float(m * m)}


def _content_factors(c: int, m: int) -> dict[str, float]:
    return {"mean": 1.0, "half-sum": c * m / 2.0}


GRAM_NORMS = tuple(_style_factors(1, 1))
CONTENT_NORMS = tuple(_content_factors(1, 1))


def style_norm_factor(norm: str, c: int, m: int) -> float:
    """Factor turning the default per-layer style term into ``norm``'s (see the table above)."""
    factors = _style_factors(c, m)
    if norm not in factors:
        raise ValueError(f"unknown Gram normalisation {norm!r}; choose one of {', '.join(GRAM_NORMS)}")
    return factors[norm]


def content_norm_factor(norm: str, c: int, m: int) -> float:
    """Factor turning the mean content term into ``norm``'s."""
    factors = _content_factors(c, m)
    if norm not in factors:
        raise ValueError(f"unknown content normalisation {norm!r}; choose one of {', '.join(CONTENT_NORMS)}")
    return factors[norm]
