"""The post-hoc EMA curve: FID (and class agreement) against the reconstructed width sigma_rel, with the run's fixed
EMA as a horizontal line, from a benchmarks/recipes.py JSON whose rows are post-hoc reconstructions (checkpoints
written by `kakusan ema reconstruct`) and one row labelled fixed-*.

    python benchmarks/plot_posthoc.py benchmarks/results/posthoc_ema_mnist.json --out docs/images/posthoc-ema-mnist.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kakusan.checkpoints import read_config, resolve_checkpoint  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(args.results).read_text())["rows"]
    curve, fixed = [], None
    for r in rows:
        s = r["scores"]
        point = (s["fid"], 100 * s.get("class_agreement", float("nan")))
        rec = read_config(resolve_checkpoint(r["row"]["ckpt"])).get("ema_reconstruction")
        if rec is None:
            fixed = (r["row"]["label"], *point)
        else:
            curve.append((rec["sigma_rel"], *point))
    if not curve:
        raise SystemExit(f"{args.results}: no post-hoc EMA reconstructions among its rows")
    curve.sort()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, i, name in ((ax1, 1, "classifier-feature FID"), (ax2, 2, "class agreement (%)")):
        ax.plot([c[0] for c in curve], [c[i] for c in curve], "o-", label="post-hoc EMA (reconstructed)")
        if fixed is not None:
            ax.axhline(fixed[i], color="C3", ls="--", label=f"the run's fixed EMA ({fixed[0]})")
        ax.set_xlabel("EMA width sigma_rel")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    n = json.loads(Path(args.results).read_text())["n"]
    fig.suptitle(f"{Path(args.results).stem}: {n} samples per point, same noise")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
