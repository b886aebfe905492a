"""--device, checked before anything heavy: one shared rule for every step that has the option.

`cpu`, `cuda` or `cuda:N`. torch is imported only for a CUDA device (to ask whether this torch was
built with CUDA and how many devices it sees); the check costs nothing on the CPU path.
"""

from __future__ import annotations

import re

from vcu128.io.errors import VCUError

GPU_SETUP = "see README 'GPU setup'"


def check_device(spec: str, flag: str = "--device") -> str:
    """`spec` if this machine can run on it; else a VCUError (one `error:` line and a hint)."""
    if spec == "cpu":
        return spec
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise VCUError(f"{flag} {spec}: expected cpu, cuda or cuda:N (N a device number, e.g. cuda:0)")
    import torch

    if torch.version.cuda is None:
        raise VCUError(f"{flag} {spec}: this torch ({torch.__version__}) has no CUDA; {GPU_SETUP}",
                       "VCU128_TORCH=cuda source scripts/venv.sh installs torch's CUDA build (or pass --device cpu)")
    count = torch.cuda.device_count()
    if count == 0:
        raise VCUError(f"{flag} {spec}: torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device here",
                       "check nvidia-smi and CUDA_VISIBLE_DEVICES, or pass --device cpu")
    if m.group(1) is not None and int(m.group(1)) >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 .. cuda:{count - 1}"
        raise VCUError(f"{flag} {spec}: this machine has {count} CUDA device{'s' if count > 1 else ''} ({have})")
    return spec
