"""medhmp: hierarchical multimodal pretraining on electronic health records (MedHMP, EMNLP 2023).

Usage: python medhmp.py demo (synthetic cohort -> ... -> results table), or stage by stage:
    python medhmp.py synth --out data/raw; python medhmp.py preprocess --raw data/raw --out data/processed
    python medhmp.py pretrain --level stay; python medhmp.py pretrain --level admission
    python medhmp.py evaluate --task all                   # or one task, e.g. --task mortality
The command line only parses options and delegates: every default lives in the config dataclass of
the module that does the work, so options default to None and only what was given is passed on.
"""
import dataclasses
import math
from pathlib import Path

import click

import demo
import evaluate
import paper_tables
import synthetic
import train
from folders import InputError, sigterm_as_interrupt
from preprocessing import pipeline


def _run(function, config_class, **options):
    """Build the config from the given options (None = not given) and run; bad input is one line."""
    cfg = dataclasses.replace(config_class(), **{k: v for k, v in options.items() if v is not None})
    try:
        with sigterm_as_interrupt():   # SIGTERM cleans up as Ctrl-C does (no .tmp left behind)
            return function(cfg)
    except (InputError, train.NonFiniteLoss) as err:
        raise click.ClickException(str(err)) from None


def _option(name: str, config_class, text: str = "", **kw):
    """--name, defaulting to None: the config dataclass holds the default, which the help shows."""
    default = getattr(config_class(), name.lstrip("-").replace("-", "_"))
    return click.option(name, help=f"{text} [default: {default}]".lstrip(), **kw)


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every range comparison)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


PathOption, PositiveFloat = click.Path(path_type=Path), FiniteRange(min=0, min_open=True)


class RateList(click.ParamType):
    """One learning rate or a comma-separated grid of them, each a positive finite number."""
    name = "LR[,LR...]"

    def convert(self, value, param, ctx):
        rates = value if isinstance(value, tuple) else str(value).split(",")   # a tuple: converted already
        return tuple(PositiveFloat.convert(v, param, ctx) for v in rates)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """MedHMP: pretrain on MIMIC-style EHR extracts, then evaluate on eight downstream tasks."""


@cli.command()
@click.option("--out", type=PathOption, required=True, help="Folder to write the extract to.")
@_option("--patients", synthetic.SynthConfig, type=click.IntRange(min=1))
@_option("--layout", synthetic.SynthConfig, type=click.Choice(synthetic.LAYOUTS))
@_option("--seed", synthetic.SynthConfig, type=int)
@_option("--event-scale", synthetic.SynthConfig, "Chart rows per stay-hour multiplier.", type=FiniteRange(min=0.1))
def synth(**options):
    """Write a synthetic cohort drawn from a latent model (true latents in OUT/latents/) in a MIMIC-III, MIMIC-IV
    or diagnosis-extract layout."""
    done = _run(synthetic.synthesize, synthetic.SynthConfig, **options)
    click.echo("wrote {out}: {patients} patients, {admissions} admissions, {stays} ICU stays".format(**done))


@cli.command()
@_option("--raw", pipeline.PreprocessConfig, "Folder of CSV extracts.", type=PathOption)
@click.option("--notes", type=PathOption, help="Note table or folder (NOTEEVENTS*, MIMIC-IV-Note discharge).")
@_option("--out", pipeline.PreprocessConfig, type=PathOption)
@_option("--text-model", pipeline.PreprocessConfig, "'hashing', a local Hugging Face folder, or a hub name.")
@_option("--text-device", pipeline.PreprocessConfig)
@click.option("--limit-patients", type=click.IntRange(min=1), help="Keep a deterministic sample of N patients.")
@click.option("--vocab-from", type=PathOption, help="Reuse the code vocabularies of another processed folder.")
@_option("--seed", pipeline.PreprocessConfig, type=int)
def preprocess(**options):
    """Build the processed hierarchical dataset (features, codes, notes, labels, splits)."""
    _run(pipeline.preprocess, pipeline.PreprocessConfig, **options)


@cli.command()
@click.option("--level", type=click.Choice(list(train.LEVELS)), required=True, help="Pretraining stage.")
@_option("--data", train.StayPretrainConfig, type=PathOption)
@_option("--run", train.StayPretrainConfig, type=PathOption)
@click.option("--epochs", type=click.IntRange(min=1), help="[default: 200 stay, 300 admission (paper)]")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimiser steps.")
@click.option("--batch-size", type=click.IntRange(min=1), help="[default: 128 stay, 4096 admission (paper)]")
@click.option("--lr", type=PositiveFloat, help="[default: 5e-4 stay, 2e-5 admission (paper)]")
@_option("--device", train.StayPretrainConfig, type=click.Choice(train.DEVICES))
@_option("--precision", train.StayPretrainConfig, type=click.Choice(train.PRECISIONS))
@_option("--num-workers", train.StayPretrainConfig, type=click.IntRange(min=0))
@_option("--d-model", train.StayPretrainConfig, type=click.IntRange(min=1))
@_option("--patience", train.StayPretrainConfig, "Stop after N passes without improvement (0: never).",
         type=click.IntRange(min=0))
@click.option("--resume", is_flag=True, default=None, help="Continue from RUN/<level>.pt.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing RUN/<level>.pt.")
@_option("--seed", train.StayPretrainConfig, type=int)
def pretrain(level, **options):
    """Pretrain the stay level (reconstruction), then the admission level (MCP + contrastive)."""
    _run(train.pretrain, train.LEVELS[level], **options)


@cli.command(name="evaluate")
@click.option("--task", type=click.Choice([*evaluate.TASKS, "all"]), required=True, help="Downstream task.")
@_option("--data", evaluate.FinetuneConfig, type=PathOption)
@_option("--run", evaluate.FinetuneConfig, "Checkpoints in, eval/ and results.csv out.", type=PathOption)
@_option("--init", evaluate.FinetuneConfig, type=click.Choice(evaluate.INITS))
@_option("--seeds", evaluate.FinetuneConfig, type=click.IntRange(min=1))
@_option("--model", evaluate.FinetuneConfig, "all: the paper's tables.", type=click.Choice([*evaluate.MODELS, "all"]))
@click.option("--lr", type=RateList(), help="One learning rate for every level, or a grid (e.g. 1e-3,5e-3,2e-2) "
              "chosen per init on validation. [default: 5e-3 stay and admission, 5e-2 patient]")
@click.option("--probe", is_flag=True, default=None, help="Train only the head on the frozen encoder.")
@_option("--batch-size", evaluate.FinetuneConfig, type=click.IntRange(min=1))
@_option("--epochs", evaluate.FinetuneConfig, type=click.IntRange(min=1))
@_option("--device", evaluate.FinetuneConfig, type=click.Choice(train.DEVICES))
@_option("--precision", evaluate.FinetuneConfig, type=click.Choice(train.PRECISIONS))
@_option("--label-fraction", evaluate.FinetuneConfig, "Fine-tune on this share of the training labels (low-resource "
         "runs).", type=FiniteRange(0, 1, min_open=True))
@_option("--labels", evaluate.FinetuneConfig, "Or this many, stratified.", type=click.IntRange(min=4))
@_option("--seed", evaluate.FinetuneConfig, type=int)
def evaluate_command(**options):
    """Fine-tune on downstream tasks and write metrics with CIs; --model all: the paper's Tables 1-3 (RUN/tables/)."""
    _run(paper_tables.tables if options["model"] == "all" else evaluate.evaluate, evaluate.FinetuneConfig, **options)


@cli.command(name="demo")
@_option("--out", demo.DemoConfig, type=PathOption)
@_option("--patients", demo.DemoConfig, type=click.IntRange(min=50))
@_option("--seed", demo.DemoConfig, type=int)
def demo_command(**options):
    """Synthetic cohort -> preprocess -> pretrain (and a shuffled control) -> every task, in minutes on a CPU."""
    _run(demo.demo, demo.DemoConfig, **options)


if __name__ == "__main__":
    cli()
