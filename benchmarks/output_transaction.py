#!/usr/bin/env python
"""Cost of the output transaction's ownership record: a folder of 16 x 64 MiB files (hashed) and of
2 x 512 MiB files (recognised by size and time), written, then verified on --overwrite."""
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pave_plugins.io.output import output_folder


def run(n, size):
    d = Path(tempfile.mkdtemp())
    blob = np.random.default_rng(0).bytes(size)
    t0 = time.perf_counter()
    with output_folder(d / "out", who="bench") as s:
        for i in range(n):
            (s / f"f{i}.bin").write_bytes(blob)
        t1 = time.perf_counter()
    t2 = time.perf_counter()
    with output_folder(d / "out", who="bench", overwrite=True) as s:
        t3 = time.perf_counter()
        (s / "x").write_bytes(b"1")
    t4 = time.perf_counter()
    print(f"{n} x {size >> 20} MiB: writing {t1 - t0:.2f} s, sealing (umask + record) {t2 - t1:.2f} s, "
          f"checking the old output before --overwrite {t3 - t2:.2f} s, swap {t4 - t3:.2f} s")
    shutil.rmtree(d)


if __name__ == "__main__":
    run(16, 64 << 20)
    run(2, 512 << 20)
