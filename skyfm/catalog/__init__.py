"""Catalogs: detections -> tables with world coordinates, writers, cross-matching, metrics, association.

* :func:`build_catalog` — the DESIGN.md columns (``x``, ``y``, ``glon``/``glat`` or ``ra``/``dec``, ``pos_err``,
  ``flux``, ``flux_err``, ``score``, ``class``, ``class_prob``, ``extension``) with units and descriptions.
* :func:`write_catalog` / :func:`read_catalog` — FITS, ECSV or VOTable by extension, written atomically, with a
  DS9 region file beside the catalog.
* :func:`match_catalogs` — one-to-one matching within a radius (Hungarian assignment per group of candidates).
* :func:`detection_metrics`, :func:`associate` and friends in :mod:`skyfm.catalog.metrics`.
* :mod:`skyfm.catalog.likelihood` — the Poisson likelihood of counts cubes: TS maps and point-source fits.

This package knows tables and coordinates, not torch.
"""

from __future__ import annotations

from skyfm.catalog.io import read_catalog, read_table, write_catalog, write_regions
from skyfm.catalog.match import match_catalogs
from skyfm.catalog.table import DESCRIPTIONS, build_catalog, empty_catalog


def __getattr__(name):  # metrics import lazily (they pull in more of scipy and the instruments)
    if name in ("detection_metrics", "associate", "cramer_rao_position", "flux_metrics", "localization_metrics",
                "precision_recall_curve", "recall_at_precision"):
        from skyfm.catalog import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'skyfm.catalog' has no attribute {name!r}")


__all__ = ["DESCRIPTIONS", "build_catalog", "empty_catalog", "match_catalogs", "read_catalog", "read_table",
           "write_catalog", "write_regions", "detection_metrics", "associate", "cramer_rao_position"]
