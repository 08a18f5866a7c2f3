"""metrics.jsonl writer, a progress line with tokens/s, and curve plots."""
from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsWriter:
    """Appends one JSON object per line to `path`.

    On resume, lines of steps after the checkpoint are dropped (`truncate_after`): those steps are
    about to be recomputed, so the file stays one clean sequence, as if never interrupted.

    tensorboard=True also writes every numeric field of each row as a TensorBoard scalar (tag =
    the field name, step = the row's "step") under <dir of path>/tb/, flushed with each row. On
    resume the event writer is opened with purge_step = the checkpoint's step + 1, so TensorBoard
    drops the old events of the recomputed steps just as the jsonl lines are dropped.
    """

    def __init__(self, path: str, truncate_after: int | None = None, enabled: bool = True,
                 tensorboard: bool = False):
        self.path, self.enabled, self.tb = path, enabled, None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if truncate_after is not None and os.path.exists(path):
            keep = [line for line in read_metrics(path) if line.get("step", 0) <= truncate_after]
            from .checkpoint import atomic_write_bytes
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        elif truncate_after is None and os.path.exists(path):
            os.unlink(path)  # a fresh run (no checkpoint) starts a fresh file
        if tensorboard:
            self.tb = _tensorboard_writer(os.path.join(os.path.dirname(os.path.abspath(path)), "tb"),
                                          truncate_after)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=True) + "\n")
            f.flush()
        if self.tb is not None:
            step = int(clean.get("step", 0))
            for k, v in clean.items():
                # strings, lists and None have no scalar form; bools are plotted as 0/1
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, float(v), step)
            self.tb.flush()  # blocks until the events are on disk: a crash loses no logged step

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _tensorboard_writer(log_dir: str, truncate_after: int | None):
    """A torch SummaryWriter on log_dir; a fresh run removes the event files of an earlier one."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the separate `tensorboard` package
        from .config import ConfigError
        raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard") from None
    if truncate_after is None and os.path.isdir(log_dir):
        for name in os.listdir(log_dir):
            if name.startswith("events.out.tfevents."):
                os.unlink(os.path.join(log_dir, name))
    purge = truncate_after + 1 if truncate_after is not None else None
    return SummaryWriter(log_dir=log_dir, purge_step=purge, flush_secs=3600)


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash: everything after it is unreliable
    return rows


class Progress:
    """One live line per stage: ``[sft] step 120/300 loss 1.234 | 41s, ETA 1m02s``.

    On a terminal the line is rewritten in place (``\\r``, at most 4 times a second); in a log
    file (stderr not a terminal) a new line is printed every `every_s` seconds and at the end,
    so a run piped to a file still shows where it is. ETA = elapsed / steps done x steps left,
    counted from `initial` (a resumed run does not count the steps it skipped).
    """

    lines_only = False  # set in processes that share a terminal: a line each, no rewriting

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 every_s: float = 10.0, stream=None):
        self.total, self.initial, self.desc, self.enabled = total, initial, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and not Progress.lines_only
        self.every_s = 0.25 if self.tty else every_s
        self.t0, self.last_print, self.step, self.text = time.time(), 0.0, initial, ""

    def line(self) -> str:
        elapsed = time.time() - self.t0
        done = self.step - self.initial
        eta = elapsed / done * (self.total - self.step) if done > 0 else float("nan")
        info = f" {self.text}" if self.text else ""
        return (f"[{self.desc}] {self.step}/{self.total}{info} | {_duration(elapsed)}, "
                f"ETA {_duration(eta)}")

    def update(self, step: int, **info):
        if not self.enabled:
            return
        self.step = step
        self.text = " ".join(f"{k} {_fmt(v)}" for k, v in info.items() if v is not None)
        if time.time() - self.last_print >= self.every_s or step >= self.total:
            self.last_print = time.time()
            self._emit()

    def _emit(self):
        if self.tty:
            print("\r\033[K" + self.line(), end="", file=self.stream, flush=True)
        else:
            print(self.line(), file=self.stream, flush=True)

    def close(self):
        if self.enabled and self.tty and self.last_print:
            print(file=self.stream, flush=True)  # keep the finished line
        self.enabled = False


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _fmt(v):
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) and math.isfinite(v):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def plot_curves(series: dict, path: str, title: str = "") -> bool:
    """series: {panel name: {label: (xs, ys)}} -> a PNG grid. Returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = len(series)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, series.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=label, lw=1.2)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
