"""`kdhar evaluate`: scores a logged model on a dataset's test split."""

from __future__ import annotations

import click

from kdhar.cli.data import ensure_data
from kdhar.cli.options import EVAL_OPTIONS, bool_option, build_config, explicit_clip, run_options


@click.command("evaluate")
@click.option("--model", "model_uri", required=True, help="models:/ or runs:/ URI of the model to score")
@bool_option("--retrieval", default=False, show_default=True,
             help="also clip retrieval top-1/5/10/20/50 of test videos against training videos (label-free)")
@bool_option("--probe", default=False, show_default=True,
             help="also a linear probe: logistic regression fitted on the frozen features of every training video, "
                  "scored on the test videos (probe_top1/5)")
@run_options(only=EVAL_OPTIONS)
def evaluate_cmd(model_uri: str, retrieval: bool, probe: bool, **opts) -> None:
    """Score a logged model on a dataset's test split (clip/video accuracy, optionally retrieval and a
    linear probe of its features; a label-free encoder or a model of another class set: those only)."""
    from kdhar.evaluation import evaluate_model

    cfg = build_config("c3d", opts)
    ensure_data(cfg.data.root)
    metrics = evaluate_model(model_uri, cfg, experiment=opts["experiment"], device=opts["device"],
                             explicit=explicit_clip(opts), retrieval=bool(retrieval),
                             probe=bool(probe))
    click.echo(", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


COMMANDS = (evaluate_cmd,)
