"""The side-by-side table of ``benchmarks/side_by_side.py`` on a CUDA GPU.

Run: ``python benchmarks/cuda_table.py`` (no arguments). Every step synchronizes the
device, so step times include the GPU work; without CUDA it says so and exits 0.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"No CUDA device here (torch {torch.__version__}): nothing to measure.")
        return 0
    import side_by_side

    print(f"GPU: {torch.cuda.get_device_name(0)}")
    side_by_side.main([], device="cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
