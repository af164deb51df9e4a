"""Compare two folders of reference dumps (scripts/reference.py): max relative difference per file."""
import os
import sys

import numpy as np

a, b = sys.argv[1], sys.argv[2]
worst = 0.0
for f in sorted(os.listdir(a)):
    if not f.endswith(".bin"):
        continue
    x = np.fromfile(os.path.join(a, f), dtype=np.uint8)
    y = np.fromfile(os.path.join(b, f), dtype=np.uint8)
    if x.size != y.size:
        print(f"{f}: sizes differ"); worst = 1e9; continue
    fx = np.frombuffer(x[1024:].tobytes()[: (x.size - 1024) // 4 * 4], dtype="<f4")
    fy = np.frombuffer(y[1024:].tobytes()[: (y.size - 1024) // 4 * 4], dtype="<f4")
    d = float(np.max(np.abs(fx.astype(np.float64) - fy)) / (np.max(np.abs(fy)) + 1e-30))
    print(f"{f}: identical bytes: {bool((x == y).all())}, max rel diff (as fp32 words) {d:.2e}")
    worst = max(worst, d if "model" in f else 0.0)
print("model files max rel diff", worst)
