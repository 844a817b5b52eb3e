"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models", sec. 3).

While training, K power-function EMAs of the weights are tracked and each is saved every N steps (a snapshot);
afterwards an EMA of any width, ending at any snapshot's step, is reconstructed as a linear combination of the
snapshots, whose coefficients come from a least-squares fit of the averaging profiles.

The power-function EMA of exponent gamma averages the weights theta_1 .. theta_t (theta_k: after optimizer step k) as

    theta_ema_t = beta_t theta_ema_{t-1} + (1 - beta_t) theta_t,     beta_t = (1 - 1/t)^(gamma + 1)

so its weight on step k is w_k = (k^(g+1) - (k-1)^(g+1)) / t^(g+1) (the product of the betas telescopes): exactly the
mass on [k-1, k] of the density p(tau) = (g+1) tau^g / t^(g+1) on [0, t]. Its relative width sigma_rel is the
standard deviation of p over t:

    mean = t (g+1)/(g+2),  E[tau^2] = t^2 (g+1)/(g+3)  =>  sigma_rel^2 = (g+1) / ((g+2)^2 (g+3)).

sigma_rel falls from 1/sqrt(12) ~ 0.2887 at gamma = 0 (the running mean of all weights) towards 0 as gamma grows
(sigma_rel ~ 1/gamma); the widths below 0.2887 are the ones on offer (gamma < 0 would weigh early steps most).

Disk: a snapshot holds every value of the model's state dict in float32, so a run writes
``parameters x 4 bytes x profiles x snapshots`` (snapshots = steps / every, + 1 at the last step if it is not a
multiple), printed once when training starts.
"""

from __future__ import annotations

import json
import math
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError

SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # gamma = 0: the uniform average of every step so far
SNAPSHOT_DIR = "posthoc-ema"
SNAPSHOT_KIND = "kakusan-posthoc-ema-snapshot"
STATE_FILE = "posthoc_ema.safetensors"  # the trackers, inside each checkpoint (exact resume)
STATE_KIND = "posthoc-ema-state"
FIT_WARN = 0.05  # a reconstruction whose profile fit error is above this is warned about


# ---- gamma <-> sigma_rel ------------------------------------------------------------------------------------------

def sigma_rel_of_gamma(gamma: float) -> float:
    """The relative standard deviation of the power profile of exponent ``gamma`` >= 0."""
    g = float(gamma)
    if not (math.isfinite(g) and g >= 0):
        raise ConfigError(f"a power EMA's exponent gamma must be finite and >= 0, got {gamma!r}")
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width ``sigma_rel`` in (0, 1/sqrt(12)]: the largest real
    root of  s g^3 + 7 s g^2 + (16 s - 1) g + (12 s - 1) = 0  (s = sigma_rel^2; from s (g+2)^2 (g+3) = g+1),
    polished by Newton's method on the log of the relation, in float64."""
    try:
        s = float(sigma_rel)
    except (TypeError, ValueError):
        raise ConfigError(f"sigma_rel must be a number, got {sigma_rel!r}") from None
    if not (math.isfinite(s) and 0 < s <= SIGMA_REL_MAX * (1 + 1e-12)):
        raise ConfigError(f"sigma_rel {sigma_rel!r} is outside (0, {SIGMA_REL_MAX:.4f}]: the relative width of a "
                          f"power EMA ranges from 0 (the latest weights) to 1/sqrt(12) (the mean of all of them); "
                          f"the paper's are 0.05 - 0.15")
    s2 = s * s
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots.real[np.abs(roots.imag) <= 1e-6 * np.maximum(1.0, np.abs(roots))]
    g = max(float(real.max()) if real.size else 0.0, 0.0)
    target = 2 * math.log(s)
    for _ in range(50):  # phi(g) = log sigma_rel(g)^2 - log s, decreasing for g >= 0
        phi = math.log(g + 1) - 2 * math.log(g + 2) - math.log(g + 3) - target
        dphi = 1 / (g + 1) - 2 / (g + 2) - 1 / (g + 3)
        step = phi / dphi
        g = max(g - step, 0.0)
        if abs(step) <= 1e-15 * max(1.0, g):
            break
    return g


def beta(t: int, gamma: float) -> float:
    """The decay of step t (1-based): (1 - 1/t)^(gamma + 1); 0 at t = 1, so the average starts at the weights."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


# ---- the profiles and the least-squares fit -------------------------------------------------------------------------

def profile_inner(t_a, g_a, t_b, g_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_a p_b over [0, min(t_a, t_b)], p(tau) = (g+1) tau^g / T^(g+1) on [0, T]:
    (g_a+1)(g_b+1) m^(g_a+g_b+1) / ((g_a+g_b+1) T_a^(g_a+1) T_b^(g_b+1)), m = min(T_a, T_b); computed in log space
    (float64, broadcasting) so large exponents neither overflow nor underflow."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) - np.log(g_a + g_b + 1) + (g_a + g_b + 1) * np.log(m)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def reconstruction_coefficients(steps, gammas, target_step: float, target_gamma: float) -> tuple[np.ndarray, float]:
    """Coefficients x of the snapshots (steps T_i, exponents g_i) whose combination sum_i x_i p_i is the
    least-squares fit of the target profile (T*, g*) under sum_i x_i = 1 (the weights of an average sum to 1, as
    every profile's integral does): the KKT system [[A, 1], [1^T, 0]] [x; mu] = [b; 1] with A_ij = <p_i, p_j>,
    b_i = <p_i, p*>, solved by lstsq in float64. Returns (x, relative error ||sum x_i p_i - p*|| / ||p*||)."""
    t = np.asarray(steps, dtype=np.float64) / float(target_step)  # the fit is scale-free: times in units of T*
    g = np.asarray(gammas, dtype=np.float64)
    if t.ndim != 1 or t.shape != g.shape or not t.size:
        raise ConfigError("reconstruction needs one or more snapshots, each with a step and an exponent")
    if not (np.all(t > 0) and np.all(g >= 0)):
        raise ConfigError("snapshot steps must be positive and exponents >= 0")
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])  # (K, K)
    b = profile_inner(t, g, 1.0, target_gamma)  # (K,)
    k = len(t)
    kkt = np.ones((k + 1, k + 1))
    kkt[:k, :k], kkt[k, k] = A, 0.0
    x = np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:k]
    pp = float(profile_inner(1.0, target_gamma, 1.0, target_gamma))
    err2 = pp - 2 * float(x @ b) + float(x @ A @ x)
    return x, math.sqrt(max(err2, 0.0) / pp)


# ---- the tracker --------------------------------------------------------------------------------------------------

class PowerEMA:
    """K power-function EMAs of a model's parameters (float32 copies on the model's device), one per sigma_rel.
    ``update`` after each step; ``state_dict`` / ``load_state_dict`` resume it exactly. ``run_id``: the identity of
    the run (a uuid made when the run starts, kept by a resume through the state's metadata, written into every
    snapshot): the snapshots of one run are those with its id."""

    def __init__(self, model: torch.nn.Module, sigma_rels):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels:
            raise ConfigError("a post-hoc EMA tracker needs at least one sigma_rel")
        self.gammas = tuple(gamma_of_sigma_rel(s) for s in self.sigma_rels)
        self.names = [n for n, _ in model.named_parameters()]
        self.averages = [[p.detach().float().clone() for p in model.parameters()] for _ in self.sigma_rels]
        self.step = 0  # updates so far: the t of the newest average
        self.run_id = uuid.uuid4().hex

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """theta_ema <- beta_t theta_ema + (1 - beta_t) theta for each profile, t = the count of updates."""
        self.step += 1
        params = [p.detach().float() for p in model.parameters()]
        for gamma, avg in zip(self.gammas, self.averages):
            torch._foreach_lerp_(avg, params, 1.0 - beta(self.step, gamma))

    def weights(self, k: int, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Profile k as a state dict of ``model`` (its buffers as they are now) and the names of those buffers."""
        own = dict(zip(self.names, self.averages[k]))
        state = model.state_dict()
        return {name: own.get(name, v) for name, v in state.items()}, [n for n in state if n not in own]

    def snapshot_bytes(self, model: torch.nn.Module) -> int:
        """The size of one profile's snapshot file (without its small header)."""
        tensors, _ = self.weights(0, model)
        return sum(v.numel() * v.element_size() for v in tensors.values())

    def save_snapshots(self, model: torch.nn.Module, run: str | Path, images_seen: int,
                       regular: bool = True) -> list[Path]:
        """Each profile's weights now, as ``RUN/posthoc-ema/step-XXXXXXXX-srS.safetensors`` (written atomically).
        ``regular``: at a multiple of the run's snapshot interval (False: the extra one at a run's last step)."""
        from ..checkpoints import save_file_atomic

        paths = []
        for k, (s, g) in enumerate(zip(self.sigma_rels, self.gammas)):
            tensors, buffers = self.weights(k, model)
            meta = {"kind": SNAPSHOT_KIND, "step": str(self.step), "sigma_rel": repr(s), "gamma": repr(g),
                    "images_seen": str(images_seen), "run_id": self.run_id, "regular": "1" if regular else "0",
                    "buffers": json.dumps(buffers)}
            path = Path(run) / SNAPSHOT_DIR / snapshot_name(self.step, s)
            paths.append(save_file_atomic(path, tensors, meta))
        return paths

    def state_metadata(self) -> dict[str, str]:
        """The metadata of the state file (beside :meth:`state_dict`'s tensors): its kind and the run id."""
        return {"kind": STATE_KIND, "run_id": self.run_id}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"step": torch.tensor([self.step], dtype=torch.int64),
               "sigma_rel": torch.tensor(self.sigma_rels, dtype=torch.float64)}
        for k, avg in enumerate(self.averages):
            out.update({f"profile{k}.{name}": a for name, a in zip(self.names, avg)})
        return out

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "post-hoc EMA state",
                        metadata: dict | None = None) -> None:
        """The tensors of :meth:`state_dict`; ``metadata`` (:meth:`state_metadata`) brings the run id back."""
        saved = tuple(tensors["sigma_rel"].tolist()) if "sigma_rel" in tensors else None
        if saved != self.sigma_rels:
            raise CheckpointError(f"{where}: it tracks sigma_rel {saved}, this run {self.sigma_rels}")
        for k, avg in enumerate(self.averages):
            for name, a in zip(self.names, avg):
                v = tensors.get(f"profile{k}.{name}")
                if v is None or v.shape != a.shape:
                    raise CheckpointError(f"{where}: profile {k} has no {name} of shape {tuple(a.shape)}")
                a.copy_(v)
        self.step = int(tensors["step"][0])
        if (metadata or {}).get("run_id"):
            self.run_id = metadata["run_id"]


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"step-{step:08d}-sr{sigma_rel:.3f}.safetensors"


def snapshot_count(steps: int, every: int) -> int:
    """Snapshots of each profile in a run of ``steps``: the multiples of ``every`` and the last step."""
    return steps // every + (steps % every != 0)


def disk_cost_line(tracker: PowerEMA, model: torch.nn.Module, steps: int, every: int, run: str | Path) -> str:
    per = tracker.snapshot_bytes(model)
    n, k = snapshot_count(steps, every), len(tracker.sigma_rels)
    shown = ", ".join(f"{s:g}" for s in tracker.sigma_rels)
    gammas = ", ".join(f"{g:.2f}" for g in tracker.gammas)
    return (f"post-hoc EMA: sigma_rel {shown} (gamma {gammas}), a snapshot of each every {every:,} steps and at the "
            f"last: {n:,} snapshots x {k} profiles x {_size(per)} = {_size(n * k * per)} in {Path(run) / SNAPSHOT_DIR}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ---- snapshots on disk and the reconstruction ----------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    path: Path
    step: int
    sigma_rel: float
    gamma: float
    images_seen: int
    run_id: str
    buffers: tuple[str, ...]
    regular: bool = True  # at a multiple of the snapshot interval (False: the extra one at a run's last step)


def list_snapshots(run: str | Path) -> list[Snapshot]:
    """The snapshots in ``RUN/posthoc-ema`` (their headers only), by step then sigma_rel."""
    from safetensors import SafetensorError, safe_open

    out = []
    for path in sorted((Path(run) / SNAPSHOT_DIR).glob("step-*-sr*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable snapshot ({type(e).__name__}: {e})") from None
        if meta.get("kind") != SNAPSHOT_KIND:
            raise CheckpointError(f"{path}: not a kakusan post-hoc EMA snapshot (kind {meta.get('kind')!r})")
        run_id = meta.get("run_id", "")
        out.append(Snapshot(path, int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"]),
                            int(meta["images_seen"]), run_id, tuple(json.loads(meta["buffers"])),
                            meta.get("regular", "1") == "1"))
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))


def no_snapshots_message(run: str | Path) -> str:
    return (f"{run}: no post-hoc EMA snapshots (in {Path(run) / SNAPSHOT_DIR}); train with --posthoc-ema "
            f"SIGMA_RELS (e.g. --posthoc-ema 0.05,0.10 --posthoc-every 500) to record them")


def current_run_id(run: str | Path, snaps: list[Snapshot]) -> str:
    """The run id of the run in ``run``: its newest checkpoint's tracker state's, else (no checkpoint with one)
    that of the snapshot written last."""
    from safetensors import SafetensorError, safe_open

    from ..checkpoints import resolve_checkpoint

    try:
        with safe_open(str(resolve_checkpoint(run) / STATE_FILE), "pt") as f:
            run_id = (f.metadata() or {}).get("run_id")
        if run_id:
            return run_id
    except (CheckpointError, SafetensorError, OSError):
        pass
    return max(snaps, key=lambda s: s.path.stat().st_mtime_ns).run_id


def run_snapshots(run: str | Path) -> tuple[dict, list[Snapshot]]:
    """The run's config and its snapshots (any left by another run in the folder are set aside, warned)."""
    from .preflight import saved_run_config

    config, _ = saved_run_config(run)
    snaps = list_snapshots(run)
    if not snaps:
        raise ConfigError(no_snapshots_message(run))
    run_id = current_run_id(run, snaps)
    foreign = [s for s in snaps if s.run_id != run_id]
    if foreign:
        warnings.warn(f"{len(foreign)} snapshot(s) in {Path(run) / SNAPSHOT_DIR} come from another run than its "
                      f"newest checkpoint's (e.g. {foreign[0].path.name}); set aside")
    snaps = [s for s in snaps if s.run_id == run_id]
    if not snaps:
        raise ConfigError(f"{run}: none of its post-hoc EMA snapshots come from the run of its newest checkpoint")
    return config, snaps


def check_reconstructable(run: str | Path, sigma_rels) -> None:
    """Refuse, before any work, a width outside (0, 1/sqrt(12)] or a run without snapshots."""
    for sr in sigma_rels:
        gamma_of_sigma_rel(sr)
    run_snapshots(run)


def set_aside_stale(run: str | Path, run_id: str, step: int) -> tuple[Path | None, list[Path]]:
    """Before a run (re)starts at ``step`` (0: a fresh one), move out of ``RUN/posthoc-ema`` the snapshots that
    are not of its trajectory up to there: another run's, those past ``step`` (an abandoned trajectory, when a run
    resumes from an earlier checkpoint), and an extra last-step one at ``step`` itself (a run stopped there early;
    it is written again if the run ends there again). They go into ``RUN/posthoc-ema/abandoned-<time>/`` (kept,
    never read). Returns (that folder, the files moved); (None, []) when none is stale."""
    stale = [s for s in list_snapshots(run)
             if s.run_id != run_id or s.step > step or (s.step == step and not s.regular)]
    if not stale:
        return None, []
    base = Path(run) / SNAPSHOT_DIR / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, i = base, 2
    while dest.exists():
        dest, i = base.with_name(f"{base.name}-{i}"), i + 1
    dest.mkdir(parents=True)
    moved = []
    for s in stale:
        moved.append(s.path.replace(dest / s.path.name))
    return dest, moved


def combine_snapshots(paths: list[Path], coefficients, buffers=()) -> dict[str, torch.Tensor]:
    """sum_i x_i theta_i over the snapshot files, read one at a time (the float64 sum and one file in memory);
    the buffers (not averaged) are the last file's."""
    from ..checkpoints import load_tensors

    acc: dict[str, torch.Tensor] = {}
    keep: dict[str, torch.Tensor] = {}
    first = None
    for path, x in zip(paths, coefficients):
        tensors = load_tensors(path)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if first is None:
            first = shapes
        elif shapes != first:
            raise CheckpointError(f"{path}: its tensors differ from {paths[0].name}'s (not the same model)")
        for k, v in tensors.items():
            if k in buffers:
                keep[k] = v
            elif k in acc:
                acc[k].add_(v.double(), alpha=float(x))
            else:
                acc[k] = v.double() * float(x)
        del tensors
    return {k: keep[k] if k in keep else acc[k].float() for k in first}


def reconstruct(run: str | Path, sigma_rel: float, step: int | None = None) -> tuple[dict, dict, dict]:
    """The EMA of width ``sigma_rel`` ending at ``step`` (default: the newest snapshot's), from the run's
    snapshots up to that step. Returns (weights as a state dict, the record of how, the run's config)."""
    gamma = gamma_of_sigma_rel(sigma_rel)
    config, snaps = run_snapshots(run)
    newest = snaps[-1].step
    if step is None:
        step = newest
    if not isinstance(step, int) or step < 1 or step > newest:
        raise ConfigError(f"--step {step!r}: the run's snapshots reach step {newest:,} (give 1 .. {newest})")
    use = [s for s in snaps if s.step <= step]
    if not use:
        raise ConfigError(f"--step {step}: the run's first snapshot is at step {snaps[0].step:,}")
    x, err = reconstruction_coefficients([s.step for s in use], [s.gamma for s in use], step, gamma)
    if err > FIT_WARN:
        tracked = sorted({s.sigma_rel for s in use})
        why = (f"step {step:,} is past the newest snapshot up to it ({use[-1].step:,})" if step > use[-1].step else
               f"sigma_rel {float(sigma_rel):g} is outside the tracked {', '.join(f'{v:g}' for v in tracked)}"
               if not tracked[0] <= sigma_rel <= tracked[-1] else f"{len(use)} snapshots")
        warnings.warn(f"post-hoc EMA sigma_rel {float(sigma_rel):g} at step {step:,}: the snapshots fit its profile "
                      f"poorly (error {100 * err:.1f}% > {100 * FIT_WARN:g}%; {why}): a target step past the newest "
                      f"snapshot, or a width far outside the tracked ones, fits poorly")
    weights = combine_snapshots([s.path for s in use], x, buffers=set(use[-1].buffers))
    record = {"sigma_rel": float(sigma_rel), "gamma": gamma, "step": step, "run": str(run),
              "run_id": use[-1].run_id, "fit_error": err,
              "images_seen": next((s.images_seen for s in use if s.step == step), None),
              "snapshots": [{"file": s.path.name, "step": s.step, "sigma_rel": s.sigma_rel, "coefficient": float(c)}
                            for s, c in zip(use, x)]}
    return weights, record, config


def reconstruct_checkpoint(run: str | Path, sigma_rel: float, step: int | None = None,
                           out: str | Path | None = None) -> Path:
    """Reconstruct (see :func:`reconstruct`) and write a checkpoint whose EMA (and model) weights are the
    reconstruction, with the run's config plus an ``ema_reconstruction`` record; ``out`` (default
    ``RUN/posthoc-ema/srS``) then holds ``step-XXXXXXXX/`` and ``latest``, and loads like any checkpoint."""
    from ..checkpoints import save_checkpoint

    weights, record, config = reconstruct(run, sigma_rel, step)
    out = Path(out) if out is not None else Path(run) / SNAPSHOT_DIR / f"sr{float(sigma_rel):.3f}"
    config = {**config, "ema_reconstruction": record}
    return save_checkpoint(out, record["step"], config, weights, weights, None,
                           {"ema_reconstruction": {k: v for k, v in record.items() if k != "snapshots"}}, keep=0)
