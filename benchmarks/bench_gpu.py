"""The GPU check as a benchmark: the same code as `kdhar bench gpu`, with the same options.

For the default teacher (C3D) and student (tiny3d, distilled from C3D) at the paper's size:
training clips/s on synthetic tensors and end to end through the project's loader, with bf16
autocast, channels_last_3d and torch.compile on and off, peak GPU memory and MFU per
configuration, and whether the loader keeps up. See kdhar/gpu_check/.

    python benchmarks/bench_gpu.py                    # on a GPU machine, about 5 minutes
    python benchmarks/bench_gpu.py --dry-run          # tiny, on the CPU, under a minute
    python benchmarks/bench_gpu.py --budget-s 600 --num-workers 8 --json /tmp/gpu.json
"""

from __future__ import annotations

import sys

from kdhar.cli import main

if __name__ == "__main__":
    sys.argv = ["kdhar", "bench", "gpu", *sys.argv[1:]]
    main()
