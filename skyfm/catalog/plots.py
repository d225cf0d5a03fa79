"""Evaluation plots (matplotlib, Agg): recall vs SNR and flux, separations in units of the CRB, flux recovery.

The three panels of :func:`evaluation_figure` are those of the AutoSourceID papers: completeness against source
strength, the distribution of position errors, and measured against true flux.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skyfm.plotting import save_figure


def evaluation_figure(results: dict, path: str | Path, title: str = "") -> Path:
    """Write a PNG of the metrics in ``results`` (as :func:`skyfm.catalog.evaluate.evaluate` returns them).

    Panels: recall per SNR bin and per flux bin; histogram of separations (in CRB units when available, else
    pixels); measured / true flux against true flux.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    det = results.get("detection", {})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    for key, label, marker in (("per_snr", "SNR", "o"), ("per_flux", "flux", "s")):
        bins = [b for b in det.get(key, []) if b["n"] > 0]
        if not bins:
            continue
        centre = np.array([np.sqrt(max(b["lo"], 1e-3) * b["hi"]) if np.isfinite(b["hi"]) else b["lo"] * 1.5 for b in bins])
        rec = np.array([b["recall"] for b in bins])
        if key == "per_flux":
            ax2 = ax.twiny()
            ax2.semilogx(centre, rec, marker + "--", color="tab:orange", label="per flux bin")
            ax2.set_xlabel("true flux", color="tab:orange")
        else:
            ax.semilogx(centre, rec, marker + "-", color="tab:blue", label="per SNR bin")
    ax.axvline(det.get("snr_min", 5.0), color="grey", ls=":", lw=1)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("true SNR", color="tab:blue")
    ax.set_ylabel("recall")
    ax.set_title(f"P={det.get('precision', np.nan):.3f} R={det.get('recall', np.nan):.3f} F1={det.get('f1', np.nan):.3f}")
    ax = axes[1]
    loc = results.get("localization", {})
    if "sep_over_crb" in loc and len(loc["sep_over_crb"]):
        v = np.asarray(loc["sep_over_crb"])
        ax.hist(v, bins=np.linspace(0, max(5.0, np.percentile(v, 98)), 30), color="tab:green", alpha=0.8)
        # a 2-D Gaussian at the bound: separation / sigma is Rayleigh
        xs = np.linspace(0, ax.get_xlim()[1], 200)
        width = (ax.get_xlim()[1]) / 30
        ax.plot(xs, len(v) * width * xs * np.exp(-0.5 * xs**2), "k--", lw=1, label="at the CRB (Rayleigh)")
        ax.set_xlabel("separation / CRB sigma")
        ax.legend(fontsize=8)
        ax.set_title(f"median sep / (1.18 CRB) = {loc.get('median_sep_over_crb', np.nan):.2f} (n={len(v)})")
    elif "sep_pix" in det and len(det["sep_pix"]):
        ax.hist(np.asarray(det["sep_pix"]), bins=30, color="tab:green", alpha=0.8)
        ax.set_xlabel("separation (pix)")
        ax.set_title(f"median separation {np.median(det['sep_pix']):.2f} pix")
    ax.set_ylabel("matched sources")
    ax = axes[2]
    fl = results.get("flux", {})
    if "ratio" in fl and len(fl["ratio"]):
        ax.loglog(fl["true_flux"], np.clip(fl["ratio"], 1e-2, 1e2), ".", ms=3, alpha=0.6)
        ax.axhline(1.0, color="k", lw=1)
        ax.set_ylim(0.1, 10)
        ax.set_xlabel("true flux")
        ax.set_ylabel("measured / true flux")
        cov = fl.get("coverage68", np.nan)
        ax.set_title(f"bias {fl.get('bias', np.nan):+.3f}, scatter {fl.get('scatter', np.nan):.3f}, 68% cover {cov:.2f}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
