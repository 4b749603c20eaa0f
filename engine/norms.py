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
C*M/2, Gatys et al., eq. 1). The factors are functions of the layer's shape: engine/losses.py computes them at every
evaluation (``content_coef``, ``style_coef``), with the layer weight folded in.
"""

from __future__ import annotations


# Plain arithmetic on C and M, so that the same functions take symbolic sizes (a graph
# exported with dynamic height and width) as well as ints. With ints, C^2 M^2 is exact
# (Python ints) and rounds once where a weight multiplies it.
_STYLE = {"chw": lambda c, m: 1.0, "hw": lambda c, m: c * c, "4n2m2": lambda c, m: c * c / 4.0,
          "raw-chw": lambda c, m: c * m, "raw": lambda c, m: (c * m) * (c * m)}
_CONTENT = {"mean": lambda c, m: 1.0, "half-sum": lambda c, m: c * m / 2.0}


GRAM_NORMS = tuple(_STYLE)
CONTENT_NORMS = tuple(_CONTENT)


def style_norm_factor(norm: str, c, m):
    """Factor turning the default per-layer style term into ``norm``'s (see the table above)."""
    if norm not in _STYLE:
        raise ValueError(f"unknown Gram normalisation {norm!r}; choose one of {', '.join(GRAM_NORMS)}")
    return _STYLE[norm](c, m)


def content_norm_factor(norm: str, c, m):
    """Factor turning the mean content term into ``norm``'s."""
    if norm not in _CONTENT:
        raise ValueError(f"unknown content normalisation {norm!r}; choose one of {', '.join(CONTENT_NORMS)}")
    return _CONTENT[norm](c, m)
