"""`kdhar bench gpu`: what a paper-size training step costs on this machine's GPU, and which CUDA
settings the engine should use.

For the default teacher (C3D, trained on labels) and student (tiny3d, distilled from a C3D) at
the paper's size, it measures, in one run sized to a time budget:

* training clips/s on synthetic tensors (a pinned batch copied to the GPU each step, no loader)
  for bf16 autocast on/off x channels_last_3d on/off (all four, eager, interleaved), then
  torch.compile on top of the best of those, side by side with its eager twin;
* peak GPU memory (`torch.cuda.max_memory_allocated`) of each configuration;
* MFU: FLOPs per clip from `kdhar.models.describe` (the torch FLOP counter) x 3 for forward +
  backward (the student's KD step adds one forward of its frozen teacher), over the device's
  dense bf16 peak;
* the loader's clips/s alone (decord decoding real video files, the paper's augmentation,
  `VideoClipDataset` + `make_loader` as `run_training` builds them, no frame cache), and
  training end to end through it, so it says whether training is loader-bound.

A setting is kept only where it is faster (geometric mean over teacher and student, by at least
`MARGIN`); otherwise the engine's current CUDA default stays. `dry_run` runs the same code at a
tiny size on the CPU, a couple of steps per configuration, for CI.

The parts: `plan` (settings grid, workloads, data, step counts), `measure` (one setting's timing,
memory and MFU; the loader), `report` (the decision, the JSON, the printout), `check` (the phases
in order).
"""

from kdhar.gpu_check.check import run_check
from kdhar.gpu_check.measure import FLOP_RULE, PEAK_BF16_TFLOPS, PEAK_SOURCE, Runner, peak_tflops
from kdhar.gpu_check.plan import EAGER, Plan, Setting, Workload, engine_default
from kdhar.gpu_check.report import DEFAULT_JSON, MARGIN, default_json_path, format_report, write_json

__all__ = [
    "DEFAULT_JSON", "EAGER", "FLOP_RULE", "MARGIN", "PEAK_BF16_TFLOPS", "PEAK_SOURCE", "Plan", "Runner", "Setting",
    "Workload", "default_json_path", "engine_default", "format_report", "peak_tflops", "run_check", "write_json",
]
