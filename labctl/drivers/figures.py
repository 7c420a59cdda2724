"""matplotlib figures as labctl writes them (``--plot FILE``): a figure without pyplot's
global state, and its file written with one-line refusals."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from labctl.core.errors import LabError, MissingDependency

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib figure with a canvas that can measure text (matplotlib imported only
    now: it is heavy and only ``--plot`` needs it)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependency("matplotlib is needed for --plot (pip install matplotlib; "
                                "scripts/setup.sh installs it)") from exc
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path, what: str = "the timeline") -> Path:
    """Write ``fig`` to ``path``, whose directory must exist (a mistyped directory is an
    error, not a new directory tree). The picture's format is the name's suffix; without
    one it is a PNG, at ``path`` + ``.png``, returned."""
    if not path.parent.is_dir():
        raise LabError(f"cannot write {what} to {path}: directory {path.parent} "
                       f"does not exist", path=str(path), directory=str(path.parent))
    kind = path.suffix[1:].lower()
    formats = fig.canvas.get_supported_filetypes()
    if not kind:
        path = path.with_name(path.name + ".png")  # where matplotlib would put it
    elif kind not in formats:
        raise LabError(f"cannot write {what} to {path}: .{kind} is no picture format "
                       f"matplotlib writes ({', '.join(sorted(formats))})", path=str(path))
    try:
        fig.savefig(path)
    except OSError as exc:  # a directory of that name, /proc, a full disk
        raise LabError(f"cannot write {what} to {path}: {exc.strerror or exc}",
                       path=str(path)) from None
    return path
