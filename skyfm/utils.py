"""Small helpers shared by every layer."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash, an exception or Ctrl-C half-way through writing leaves no half-written output behind: either the
    old file (if any) or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes[-1:]), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def format_angle(deg: float, digits: int = 3) -> str:
    """An angle in the unit a person would use for it: deg, arcmin or arcsec, ``digits`` significant digits."""
    if deg >= 0.05:
        return f"{deg:.{digits}g} deg"
    if deg >= 1 / 60:
        return f"{deg * 60:.{digits}g} arcmin"
    return f"{deg * 3600:.{digits}g} arcsec"


def read_yaml(path: str | Path, what: str):
    """The parsed content of a YAML file, or a one-line SkyfmError naming the file (and the line) that is wrong."""
    import yaml

    from skyfm.errors import SkyfmError

    path = Path(path)
    if not path.is_file():
        raise SkyfmError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SkyfmError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | None = "auto"):
    """The torch device that ``--device`` names: ``auto`` (or None) = the first CUDA GPU where one is visible, else
    the CPU; ``cpu``; ``cuda`` or ``cuda:N``. A GPU that is asked for and absent is a one-line SkyfmError."""
    import torch

    from skyfm.errors import SkyfmError

    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise SkyfmError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SkyfmError(f"--device {device}: no CUDA GPU is visible to torch here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SkyfmError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return dev


def bf16_is_fast(device) -> bool:
    """Whether bfloat16 matmuls and convolutions run natively: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 /
    AMX (elsewhere bf16 is emulated and slower than float32)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line SkyfmError."""
    from skyfm.errors import SkyfmError

    if precision not in PRECISIONS:
        raise SkyfmError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    return precision


def use_bf16(precision: str, device) -> bool:
    """Whether ``precision`` means bfloat16 autocast on ``device``: ``bf16``, or ``auto`` where bfloat16 is native
    (:func:`bf16_is_fast`); ``fp32`` never."""
    return check_precision(precision) == "bf16" or (precision == "auto" and bf16_is_fast(device))
