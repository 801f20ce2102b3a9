"""What the GPU check concludes and says: which CUDA settings to keep, the results as JSON, and the
table and verdict lines `kdhar bench gpu` prints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdhar.gpu_check.measure import FLOP_RULE, Bench, LoaderRates
from kdhar.gpu_check.plan import EAGER, Data, Setting, Setup, engine_default

# A setting must be at least this much faster to replace the engine's default (timing noise).
MARGIN = 0.02
DEFAULT_JSON = Path("benchmarks/results/gpu.json")


def default_json_path() -> Path:
    """$OUT/gpu.json when $OUT is set (a job's output folder), else benchmarks/results/gpu.json."""
    out = os.environ.get("OUT")
    return Path(out) / "gpu.json" if out else DEFAULT_JSON


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def speedup(bench: Bench, a: Setting, b: Setting, phase: str) -> float | None:
    """Geometric mean over the workloads of clips/s at `a` over clips/s at `b`, both timed in `phase`."""
    ratios = []
    for role in bench.roles:
        ra, rb = bench.runners.get((role, a)), bench.runners.get((role, b))
        cps_a = ra.clips_per_s(bench.batch, phase) if ra else None
        cps_b = rb.clips_per_s(bench.batch, phase) if rb else None
        if not cps_a or not cps_b:
            return None
        ratios.append(cps_a / cps_b)
    return geomean(ratios)


@dataclass
class Decision:
    """Which settings the measurements keep: the engine's default unless another is `MARGIN` faster."""

    default: Setting
    best_eager: Setting
    eager: Setting  # the chosen eager setting
    chosen: Setting  # the chosen eager setting, or it compiled
    compile_gain: float | None = None

    @property
    def compiled(self) -> Setting:
        return dataclasses.replace(self.eager, compile=True)


def decide_eager(bench: Bench) -> Decision:
    """The fastest eager setting (geometric mean over the workloads) where it beats the default by `MARGIN`."""
    default = engine_default()
    score = {s: geomean([bench.runners[(role, s)].clips_per_s(bench.batch, "eager") for role in bench.roles])
             for s in EAGER}
    best = max(EAGER, key=lambda s: score[s])
    chosen = default if score[default] * (1 + MARGIN) >= score[best] else best
    return Decision(default=default, best_eager=best, eager=chosen, chosen=chosen)


def decide_compile(bench: Bench, decision: Decision) -> None:
    """Keeps torch.compile where it beats its eager twin, timed in the same rounds, by `MARGIN`."""
    gain = speedup(bench, decision.compiled, decision.eager, "compile")
    decision.compile_gain = gain
    decision.chosen = decision.compiled if gain is not None and gain >= 1 + MARGIN else decision.eager


def config_rows(bench: Bench, decision: Decision) -> list[dict[str, Any]]:
    """One row per workload and setting: clips/s, step time, peak memory, MFU and any error."""
    configs = []
    for w in bench.workloads:
        for s in (*EAGER, decision.compiled):
            r = bench.runners[(w.role, s)]
            phase = "compile" if s.compile else "eager"
            cps = bench.step_rate(w.role, s)
            entry = {"model": w.role, "arch": w.arch, "label": w.label, "setting": s.name, **s.as_dict(),
                     "clips_per_s": cps, "ms_per_step": 1e3 * bench.batch / cps if cps else None,
                     "timed_blocks": len(r.times.get(phase, [])), "first_step_s": r.first_step_s,
                     "peak_mem_mib": r.peak_mib(phase), "mfu": bench.device.mfu(cps, w), "error": r.error}
            if s.compile:  # what its eager twin did in the same rounds
                entry["eager_twin_clips_per_s"] = bench.runners[(w.role, decision.eager)].clips_per_s(
                    bench.batch, "compile")
            configs.append(entry)
    return configs


def effects(bench: Bench, decision: Decision) -> dict[str, float | None]:
    """Each setting's speed-up with the others at their chosen values."""
    on_off = {k: (dataclasses.replace(decision.eager, **{k: True}), dataclasses.replace(decision.eager, **{k: False}))
              for k in ("bf16", "channels_last")}
    return {**{k: speedup(bench, on, off, "eager") for k, (on, off) in on_off.items()},
            "compile": decision.compile_gain}


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n != 1 else ''}"


def notes(setup: Setup, data: Data, det: bool, compile_skipped: str | None) -> list[str]:
    """How the figures were measured, for the JSON and the printout."""
    plan, clip = setup.plan, setup.clip
    out = [
        "synthetic rows: one batch of random clips (pinned on CUDA), copied to the device every step as the loader's are",
        f"loader: decord decodes every clip from {'generated synthetic videos' if data.generated else data.path} "
        f"({data.video['width']}x{data.video['height']}), no frame cache, the paper's augmentation "
        f"{'on' if clip.augment else 'off'}, {_workers(setup.num_workers)}; end to end leaves out the first "
        f"{plan.loader_warm_batches} batch{'es' if plan.loader_warm_batches != 1 else ''} of each run (the workers' "
        "start and queue)",
        "the KD step's frozen teacher runs under bf16 autocast on CUDA whatever the setting (LogitKD.run_teacher)",
        f"{'deterministic kernels, cuDNN autotuning off (as runs by default)' if det else 'cuDNN autotuning on'}",
    ]
    if compile_skipped:
        out.append(f"torch.compile {compile_skipped}")
    if setup.dry_run:
        out.append(f"dry run: {plan.warmup_steps} warm-up and {plan.rounds} timed steps per configuration; "
                   f"torch.compile with the {plan.compile_backend!r} backend (graph capture, no code generation)")
    return out


def recommendation(decision: Decision, device_type: str, dry_run: bool) -> tuple[str, list[str]]:
    """What to do with kdhar/engine.py's CUDA defaults, and the settings that differ from them."""
    chosen, default = decision.chosen, decision.default
    differs = [k for k, v in chosen.as_dict().items() if v != default.as_dict()[k]]
    if device_type != "cuda":
        return (f"measured on {device_type}{' (dry run)' if dry_run else ''}: not a CUDA measurement, "
                "the engine's CUDA defaults stay as they are"), differs
    if differs:
        return ("the measurement recommends changing kdhar/engine.py's CUDA default: "
                + ", ".join(f"{k} {'on' if getattr(chosen, k) else 'off'}" for k in differs)), differs
    return ("the engine's CUDA defaults (bf16 autocast, channels_last_3d, no torch.compile) are the "
            "fastest measured"), differs


def _setup_part(bench: Bench, setup: Setup, data: Data) -> dict[str, Any]:
    """The results' first keys: device, sizes, models, FLOPs and data."""
    dev, clip = bench.device, setup.clip
    return {
        "dry_run": setup.dry_run,
        "device": {"type": dev.dev.type, "name": dev.name, "capability": dev.capability, "torch": torch.__version__,
                   "cuda": torch.version.cuda},
        "size": "dry-run (tiny)" if setup.dry_run else "paper",
        "batch_size": setup.batch,
        "clip": {"clip_len": clip.clip_len, "frame_interval": clip.frame_interval, "resize": list(clip.resize),
                 "crop": clip.crop, "augment": clip.augment},
        "models": {w.role: {"arch": w.arch, "label": w.label, "width": w.width,
                            "forward_gflops_per_clip": w.forward_flops / 1e9,
                            "teacher_forward_gflops_per_clip": w.teacher_flops / 1e9,
                            "train_gflops_per_clip": w.train_flops / 1e9} for w in bench.workloads},
        "flop_rule": FLOP_RULE,
        "peak_tflops": dev.peak,
        "peak_source": dev.peak_source,
        "data": {"root": str(data.root), "generated": data.generated, "train_videos": len(data.index.samples),
                 "classes": data.classes, "first_video": data.video},
    }


def results(bench: Bench, setup: Setup, data: Data, decision: Decision, loader: LoaderRates,
            determinism: tuple[bool, str], compile_skipped: str | None) -> dict[str, Any]:
    """Everything the check measured and decided (what `kdhar bench gpu` writes as JSON)."""
    det, det_note = determinism
    advice, differs = recommendation(decision, bench.device.dev.type, setup.dry_run)
    loader_bound = {}
    for w in bench.workloads:
        step_cps = bench.step_rate(w.role, decision.chosen)
        loader_bound[w.role] = bool(step_cps is not None and loader.clips_per_s < step_cps)
    return {
        **_setup_part(bench, setup, data),
        "deterministic": det,
        "determinism": det_note,
        "threads": torch.get_num_threads(),
        "compile_backend": setup.plan.compile_backend,
        "configs": config_rows(bench, decision),
        "effects": effects(bench, decision),
        "margin": MARGIN,
        "loader": {"clips_per_s": loader.clips_per_s, "num_workers": setup.num_workers, "augment": setup.clip.augment,
                   "batches": loader.batches, "frame_cache": False},
        "end_to_end": loader.end_to_end,
        "loader_bound": loader_bound,
        "engine_default": decision.default.as_dict(),
        "chosen": decision.chosen.as_dict(),
        "chosen_setting": decision.chosen.name,
        "matches_engine": not differs,
        "recommendation": advice,
        "notes": notes(setup, data, det, compile_skipped),
        "budget_s": bench.clock.budget_s,
        "seconds": bench.clock.elapsed(),
    }


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(res: dict[str, Any], e2e: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """One line per workload and setting, with what is notable about it."""
    head = (f"{'model':<24}{'setting':<19}{'clips/s':>9}{'ms/step':>9}{'peak MiB':>10}{'MFU':>8}"
            f"{'e2e clips/s':>13}{'e2e MFU':>9}  note")
    lines = [head, "-" * len(head)]
    for c in res["configs"]:
        row = e2e.get((c["model"], c["setting"]))
        note = []
        if c["setting"] == res["chosen_setting"]:
            note.append("chosen")
        if not c["compile"] and c["bf16"] == res["engine_default"]["bf16"] and \
                c["channels_last"] == res["engine_default"]["channels_last"]:
            note.append("engine's CUDA default")
        if c["compile"] and c.get("first_step_s") is not None and not c["error"]:
            note.append(f"first step {c['first_step_s']:.1f} s")
        if c["compile"] and c.get("eager_twin_clips_per_s"):
            note.append(f"eager twin {c['eager_twin_clips_per_s']:.1f}")
        if c["error"]:
            note.append(c["error"][:60])
        lines.append(
            f"{c['label']:<24}{c['setting']:<19}{_fmt(c['clips_per_s'], '.1f'):>9}{_fmt(c['ms_per_step'], '.1f'):>9}"
            f"{_fmt(c['peak_mem_mib'], '.0f'):>10}{_pct(c['mfu']):>8}{_fmt(row and row['clips_per_s'], '.1f'):>13}"
            f"{_pct(row and row['mfu']):>9}  {', '.join(note)}")
    return lines


def format_report(res: dict[str, Any]) -> str:
    """The table and the verdict lines `kdhar bench gpu` prints."""
    e2e = {(e["model"], e["setting"]): e for e in res["end_to_end"]}
    lines = _table(res, e2e)
    lines.append("")
    lines.append(f"MFU: {res['flop_rule']}; against the dense bf16 peak ({res['peak_source']}"
                 + (f": {res['peak_tflops']:g} TFLOP/s" if res["peak_tflops"] else "; pass --peak-tflops") + ")")
    fx = res["effects"]
    lines.append("effect (geometric mean over the two models, at the chosen other settings): "
                 + ", ".join(f"{k} {v:.2f}x" if v else f"{k} not measured" for k, v in fx.items()))
    loader = res["loader"]
    for role, bound in res["loader_bound"].items():
        step = next(c for c in res["configs"] if c["model"] == role and c["setting"] == res["chosen_setting"])
        run = e2e.get((role, res["chosen_setting"]))
        lines.append(
            f"{step['label']}: step {_fmt(step['clips_per_s'], '.1f')} clips/s, loader {loader['clips_per_s']:.1f} "
            f"clips/s ({_workers(loader['num_workers'])}, augmentation {'on' if loader['augment'] else 'off'}), end to end "
            f"{_fmt(run and run['clips_per_s'], '.1f')} -> "
            + ("loader-bound" if bound else "not loader-bound"))
    where = "CUDA settings" if res["device"]["type"] == "cuda" else f"settings on {res['device']['type']} (not for CUDA)"
    lines.append(f"chosen {where}: bf16 autocast {'on' if res['chosen']['bf16'] else 'off'}, channels_last_3d "
                 f"{'on' if res['chosen']['channels_last'] else 'off'}, torch.compile "
                 f"{'on' if res['chosen']['compile'] else 'off'} (kept only where >= {100 * res['margin']:.0f} % faster)")
    lines.extend(f"note: {n}" for n in res["notes"])
    lines.append(res["recommendation"])
    lines.append(f"took {res['seconds']:.1f} s (budget {res['budget_s']:.0f} s)")
    return "\n".join(lines)


def write_json(res: dict[str, Any], path: Path) -> Path:
    """Writes the results as JSON at `path` (its folder made as needed); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    return path
