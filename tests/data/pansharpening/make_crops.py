"""Regenerate the small pansharpening test crops from ../shared/data/pansharpening (see README.md).

Run from the repository root: .venv/bin/python tests/data/pansharpening/make_crops.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[3] / "shared" / "data" / "pansharpening" / "grip_unina_pnn_samples"
MS_SIZE = 64  # MS pixels per side; the PAN crop is ratio times larger
CROPS = {  # output name: (source file, top-left MS row, MS column)
    "wv2_crop": ("imgWV2.mat", 128, 128),
    "ikonos_crop": ("imgIK.mat", 128, 128),
}


def main() -> None:
    for name, (source, row, col) in CROPS.items():
        mat = loadmat(SOURCE / source)
        ratio = int(mat["ratio"].item())
        ms = mat["I_MS"][row : row + MS_SIZE, col : col + MS_SIZE].transpose(2, 0, 1)
        pr, pc, ps = ratio * row, ratio * col, ratio * MS_SIZE
        pan = mat["I_PAN"][pr : pr + ps, pc : pc + ps]
        np.savez_compressed(
            HERE / f"{name}.npz",
            ms=np.ascontiguousarray(ms),
            pan=np.ascontiguousarray(pan),
            sensor=str(mat["sensor"][0]),
            ratio=ratio,
            bits=int(mat["L"].item()),
            origin=f"{source} MS rows {row}:{row + MS_SIZE}, cols {col}:{col + MS_SIZE}",
        )
        print(f"{name}: ms {ms.shape} {ms.dtype}, pan {pan.shape}")


if __name__ == "__main__":
    main()
