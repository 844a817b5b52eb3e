"""The pictures people look at (matplotlib, PNG): noise schedules, the forward process on a 1-D mixture, the
timestep embedding, loss curves from a training log, and a denoising strip of one sample.

    kakusan plot schedules | forward | embedding | loss --run DIR | trajectory --checkpoint CKPT
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .errors import DataError

Tensor = torch.Tensor


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_schedules(path: str | Path, names=("linear", "cosine", "quadratic", "sigmoid", "scaled-linear", "flow"),
                   num_timesteps: int = 1000, zero_terminal_snr_of: str | None = "linear") -> Path:
    """beta_t, alpha_t^2 and log-SNR lambda_t for several schedules (and one rescaled to zero terminal SNR).
    For rectified flow beta_t is that of its variance-preserving equivalent (the same log-SNR)."""
    from .schedules import ScheduleConfig, make_schedule

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    configs = [(n, ScheduleConfig(n, num_timesteps)) for n in names]
    if zero_terminal_snr_of:
        configs.append((f"{zero_terminal_snr_of} + zero terminal SNR",
                        ScheduleConfig(zero_terminal_snr_of, num_timesteps, zero_terminal_snr=True)))
    t = torch.arange(num_timesteps, dtype=torch.float64)
    for label, cfg in configs:
        s = make_schedule(cfg)
        abar = s.alpha_bar_at(t)
        axes[0].plot(t, s.betas, label=label)
        axes[1].plot(t, s.alpha_sigma(t)[0] ** 2, label=label)
        lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))
        axes[2].plot(t, lam.clamp(min=-20), label=label)
    axes[0].set(yscale="log", title=r"$\beta_t$", xlabel="t")
    axes[1].set(title=r"$\alpha_t^2$ (signal variance kept; $\bar\alpha_t$ when variance-preserving)", xlabel="t")
    axes[2].set(title=r"log-SNR $\lambda_t = \log(\alpha_t/\sigma_t)$ (clipped at -20)", xlabel="t")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_forward(path: str | Path, schedule: str = "linear", ts=(0, 50, 100, 250, 500, 999), n: int = 50_000,
                 seed: int = 0) -> Path:
    """Histograms of x_t for a two-mode 1-D data distribution (modes at -1 and +1, std 0.1) at several t,
    with the exact marginal density N-mixture(alpha_t * mu, alpha_t^2 s^2 + sigma_t^2) over them."""
    from .diffusion import q_sample
    from .schedules import make_schedule

    plt = _plt()
    s = make_schedule(schedule)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) + 0.1 * torch.randn(n, generator=g)
    fig, axes = plt.subplots(1, len(ts), figsize=(3 * len(ts), 3), sharey=True)
    grid = torch.linspace(-4, 4, 400)
    for ax, t in zip(axes, ts):
        a, sg = (float(v) for v in s.alpha_sigma(float(t)))
        xt = q_sample(x0, torch.tensor(a), torch.tensor(sg), torch.randn(n, generator=g))
        ax.hist(xt.numpy(), bins=120, range=(-4, 4), density=True, color="tab:blue", alpha=0.6)
        var = a**2 * 0.01 + sg**2
        dens = sum(0.5 * torch.exp(-(grid - a * m) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)
                   for m in (-1.0, 1.0))
        ax.plot(grid, dens, "k-", lw=1)
        ax.set_title(f"t = {t}\n" + rf"$\alpha_t$={a:.3f} $\sigma_t$={sg:.3f}", fontsize=9)
    fig.suptitle(f"forward process q(x_t) on a two-mode mixture ({schedule} schedule); line = exact density")
    fig.tight_layout()
    return _save(fig, path)


def plot_embedding(path: str | Path, dim: int = 128, num_timesteps: int = 1000) -> Path:
    """The sinusoidal timestep embedding (what the U-Net receives) as a heatmap: t down, channel across."""
    from .models.unet import timestep_embedding

    plt = _plt()
    emb = timestep_embedding(torch.arange(num_timesteps), dim)
    fig, ax = plt.subplots(figsize=(8, 5))
    im = ax.imshow(emb.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set(xlabel=f"channel (first {dim // 2}: sin, last {dim // 2}: cos)", ylabel="timestep t",
           title=f"sinusoidal timestep embedding, dim {dim}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    if not path.is_file():
        raise DataError(f"training log not found: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}: line {i + 1} is not JSON (a truncated write?)") from None
    if not any("loss" in r for r in rows):
        raise DataError(f"{path}: no loss records")
    return rows


def plot_loss(log: str | Path, path: str | Path) -> Path:
    """Loss (log scale, with a smoothed line) and throughput against step, from a run's log.jsonl."""
    plt = _plt()
    rows = [r for r in read_log(log) if "loss" in r and r["loss"] is not None and math.isfinite(r["loss"])]
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, loss, alpha=0.4, label="logged mean")
    k = max(1, len(loss) // 30)
    if k > 1 and len(loss) > k:
        smooth = torch.tensor(loss).unfold(0, k, 1).mean(1).tolist()
        axes[0].plot(steps[k - 1:], smooth, label=f"moving average ({k})")
    axes[0].set(yscale="log", xlabel="step", ylabel="loss", title="training loss")
    axes[0].legend()
    ips = [(r["step"], r["images_per_s"]) for r in rows if "images_per_s" in r]
    if ips:
        axes[1].plot(*zip(*ips))
    axes[1].set(xlabel="step", ylabel="images / s", title="throughput")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_trajectory(x_t: list[Tensor], x0_hat: list[Tensor], labels: list[str], path: str | Path) -> Path:
    """Two rows: the state x_t and the predicted x0 after each shown step of one sample."""
    from .data.datasets import to_uint8

    plt = _plt()
    n = len(x_t)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.6))
    axes = axes.reshape(2, n)
    for j in range(n):
        for row, img in ((0, x_t[j]), (1, x0_hat[j])):
            u8 = to_uint8(img).permute(1, 2, 0).numpy()
            axes[row, j].imshow(u8.squeeze(-1) if u8.shape[-1] == 1 else u8, cmap="gray", vmin=0, vmax=255)
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
        axes[0, j].set_title(labels[j], fontsize=7)
    axes[0, 0].set_ylabel(r"$x_t$")
    axes[1, 0].set_ylabel(r"$\hat x_0$")
    fig.tight_layout()
    return _save(fig, path)


def _class_pipeline(checkpoint):
    """The pipeline of a checkpoint for the plots that sample it (unconditional and class-conditional models)."""
    from .errors import ConfigError
    from .pipeline import Pipeline

    pipe = Pipeline.load(checkpoint, device="cpu")
    if pipe.is_text:
        raise ConfigError("the sampling plots take unconditional and class-conditional checkpoints, not text ones")
    return pipe


def trajectory(checkpoint: str | Path, path: str | Path, sampler: str = "ddim", steps: int = 20,
               shown: int = 10, class_label: int | None = None, guidance: float | None = None,
               seed: int = 0) -> Path:
    """Sample one image from a checkpoint and plot x_t and x0_hat at ``shown`` evenly spaced steps."""
    from .errors import ConfigError

    pipe = _class_pipeline(checkpoint)
    if pipe.is_latent:
        raise ConfigError("plot trajectory shows pixels; this checkpoint samples latents")
    if pipe.num_classes and class_label is None:
        class_label = 0
    rec: list[dict] = []
    pipe(class_label=class_label, n=1, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
         callback=lambda info: rec.append({"t": float(info["t"]), "x": info["x"][0].clone(),
                                           "x0_hat": info["x0_hat"][0].clone()}))
    idx = sorted(set(torch.linspace(0, len(rec) - 1, min(shown, len(rec))).round().long().tolist()))
    return plot_trajectory([rec[i]["x"] for i in idx], [rec[i]["x0_hat"] for i in idx],
                           [f"step {i + 1}\nt={rec[i]['t']:.0f}" for i in idx], path)


def sampler_rows(checkpoint: str | Path, path: str | Path, configs: list[tuple[str, int]], n: int | None = None,
                 guidance: float | None = None, seed: int = 0) -> Path:
    """One row of samples per (sampler, steps), all from the same starting noise (one column per class for a
    class-conditional model, else ``n`` columns): the samplers side by side on one checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .errors import ConfigError
    from .samplers import get_sampler, model_calls

    for name, steps in configs:
        get_sampler(name)
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps} for {name}")
    import time

    pipe = _class_pipeline(checkpoint)
    k = pipe.num_classes
    cols = n or (min(k, 16) if k else 10)  # at most 16 columns (a 1,000-class model: its first 16 classes)
    labels = {"class_label": [c % k for c in range(cols)]} if k else {"n": cols}
    rows = []
    for name, steps in configs:
        t0 = time.perf_counter()
        x = pipe(**labels, sampler=name, steps=steps, guidance=guidance, seed=seed, progress=True).images
        print(f"{name}, {steps} steps: {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append(((x + 1) / 2).permute(0, 2, 3, 1).numpy())
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9 + 1.6, len(rows) * 0.9 + 0.2), squeeze=False)
    for r, ((name, steps), imgs) in enumerate(zip(configs, rows)):
        for c in range(cols):
            ax = axes[r][c]
            img = imgs[c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel(f"{name}\n{steps} steps, {model_calls(name, pipe.schedule, steps)} NFE", rotation=0,
                              ha="right", va="center", fontsize=8)
    title = "same starting noise in every row" + (f"; guidance {guidance:g}" if guidance is not None else "")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


METRIC_LABELS = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall",
                 "class_agreement": "class agreement", "lpips": "LPIPS"}


def plot_metrics(runs: list[str | Path], path: str | Path, labels: list[str] | None = None) -> Path:
    """Each metric logged by ``train --eval-every`` (a row) against step, images seen and training wall time
    (evaluation excluded; a column each), a line per run: several runs on one figure for comparisons. The
    best point of each run's ``eval_best`` score is ringed."""
    from .errors import ConfigError
    from .metrics.training_eval import read_eval_log

    if not runs:
        raise ConfigError("plot metrics needs --run RUN_DIR (repeat it to compare runs)")
    logs = [read_eval_log(r) for r in runs]
    labels = labels or [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    metrics = [m for m in METRIC_LABELS if any(m in rec["eval"] and rec["eval"][m] is not None
                                               for log in logs for rec in log)]
    axes_x = (("step", "step"), ("images_seen", "images seen"),
              ("train_s", "training wall time, s (evaluation excluded)"))
    plt = _plt()
    fig, axes = plt.subplots(len(metrics), 3, figsize=(13, 2.6 * len(metrics) + 0.6), squeeze=False)
    for log, label in zip(logs, labels):
        best = log[-1].get("best") or {}
        for i, m in enumerate(metrics):
            rows = [r for r in log if r["eval"].get(m) is not None]
            for j, (key, _) in enumerate(axes_x):
                ax = axes[i][j]
                (line,) = ax.plot([r[key] for r in rows], [r["eval"][m] for r in rows], "o-", ms=3, label=label)
                if m == best.get("metric"):
                    at = [r for r in rows if r["step"] == best["step"]]
                    if at:
                        ax.plot([at[0][key]], [at[0]["eval"][m]], "o", ms=10, mfc="none", color=line.get_color())
    for i, m in enumerate(metrics):
        for j, (_, xlabel) in enumerate(axes_x):
            ax = axes[i][j]
            ax.grid(alpha=0.3)
            values = [r["eval"][m] for log in logs for r in log if r["eval"].get(m) is not None]
            if m in ("fid", "kid") and min(values) > 0 and max(values) > 5 * min(values):  # spans a decade or so
                from matplotlib.ticker import ScalarFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(ScalarFormatter())
                ax.tick_params(which="minor", labelsize=7)
            if i == len(metrics) - 1:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(METRIC_LABELS[m])
    axes[0][0].legend(fontsize=8)
    rec = logs[0][-1].get("record", {})
    ex, ref, smp = rec.get("extractor", {}), rec.get("reference", {}), rec.get("samples", {})
    data = str(ref.get("data")).partition(":")[0]  # the data set's name, not where it lies
    fig.suptitle(f"metrics while training: {smp.get('n', '?')} samples ({smp.get('sampler')}, {smp.get('steps')} "
                 f"steps) per point, {ex.get('name')} features vs {ref.get('n', '?')} of {data} "
                 f"({ref.get('split')}); ringed: the best checkpoint", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
