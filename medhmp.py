"""medhmp: hierarchical multimodal pretraining on electronic health records (MedHMP, EMNLP 2023).

Usage:
    python medhmp.py demo                                  # synthetic cohort -> ... -> results table
    python medhmp.py synth --out data/raw
    python medhmp.py preprocess --raw data/raw --out data/processed
    python medhmp.py pretrain --level stay                 # then --level admission
    python medhmp.py evaluate --task mortality             # or --task all
The command line only parses options and delegates: every default lives in the config dataclass of
the module that does the work, so options default to None and only what was given is passed on.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

import demo
import evaluate
import synthetic
import train
from folders import InputError
from preprocessing import pipeline


def _run(function, config_class, **options):
    """Build the config from the given options (None = not given) and run; bad input is one line."""
    cfg = dataclasses.replace(config_class(), **{k: v for k, v in options.items() if v is not None})
    try:
        return function(cfg)
    except (InputError, train.NonFiniteLoss) as err:
        raise click.ClickException(str(err)) from None


def _default(config_class, name: str) -> str:
    return f"[default: {getattr(config_class(), name)}]"


PathOption = click.Path(path_type=Path)


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every range comparison)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


PositiveFloat = FiniteRange(min=0, min_open=True)


class RateList(click.ParamType):
    """One learning rate or a comma-separated grid of them, each a positive finite number."""
    name = "LR[,LR...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        return tuple(PositiveFloat.convert(v, param, ctx) for v in str(value).split(","))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """MedHMP: pretrain on MIMIC-style EHR extracts, then evaluate on eight downstream tasks."""


@cli.command()
@click.option("--out", type=PathOption, required=True, help="Folder to write the extract to.")
@click.option("--patients", type=click.IntRange(min=1), help=_default(synthetic.SynthConfig, "patients"))
@click.option("--layout", type=click.Choice(synthetic.LAYOUTS), help=_default(synthetic.SynthConfig, "layout"))
@click.option("--seed", type=int, help=_default(synthetic.SynthConfig, "seed"))
@click.option("--event-scale", type=FiniteRange(min=0.1),
              help="Chart rows per stay-hour multiplier, for scale benchmarks. "
                   + _default(synthetic.SynthConfig, "event_scale"))
def synth(**options):
    """Write a synthetic cohort with planted signal in a MIMIC-III, MIMIC-IV or diagnosis-extract layout."""
    summary = _run(synthetic.synthesize, synthetic.SynthConfig, **options)
    click.echo(f"wrote {summary['out']}: {summary['patients']} patients, {summary['admissions']} admissions, "
               f"{summary['stays']} ICU stays")


@cli.command()
@click.option("--raw", type=PathOption, help="Folder of CSV extracts. " + _default(pipeline.PreprocessConfig, "raw"))
@click.option("--notes", type=PathOption, help="Note table or folder (NOTEEVENTS*, MIMIC-IV-Note discharge).")
@click.option("--out", type=PathOption, help=_default(pipeline.PreprocessConfig, "out"))
@click.option("--text-model", help="'hashing', a local Hugging Face folder, or a hub name. "
              + _default(pipeline.PreprocessConfig, "text_model"))
@click.option("--text-device", help=_default(pipeline.PreprocessConfig, "text_device"))
@click.option("--limit-patients", type=click.IntRange(min=1), help="Keep a deterministic sample of N patients.")
@click.option("--vocab-from", type=PathOption, help="Reuse the code vocabularies of another processed folder.")
@click.option("--seed", type=int, help=_default(pipeline.PreprocessConfig, "seed"))
def preprocess(**options):
    """Build the processed hierarchical dataset (features, codes, notes, labels, splits)."""
    _run(pipeline.preprocess, pipeline.PreprocessConfig, **options)


@cli.command()
@click.option("--level", type=click.Choice(list(train.LEVELS)), required=True, help="Pretraining stage.")
@click.option("--data", type=PathOption, help=_default(train.StayPretrainConfig, "data"))
@click.option("--run", type=PathOption, help=_default(train.StayPretrainConfig, "run"))
@click.option("--epochs", type=click.IntRange(min=1), help="[default: 200 stay, 300 admission (paper)]")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many optimiser steps.")
@click.option("--batch-size", type=click.IntRange(min=1), help="[default: 128 stay, 4096 admission (paper)]")
@click.option("--lr", type=PositiveFloat, help="[default: 5e-4 stay, 2e-5 admission (paper)]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help=_default(train.StayPretrainConfig, "device"))
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help=_default(train.StayPretrainConfig, "precision"))
@click.option("--num-workers", type=click.IntRange(min=0), help=_default(train.StayPretrainConfig, "num_workers"))
@click.option("--d-model", type=click.IntRange(min=1), help=_default(train.StayPretrainConfig, "d_model"))
@click.option("--patience", type=click.IntRange(min=0), help="Validation passes without a lower validation loss "
              "before stopping (0: never). " + _default(train.StayPretrainConfig, "patience"))
@click.option("--resume", is_flag=True, default=None, help="Continue from RUN/<level>.pt.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing RUN/<level>.pt.")
@click.option("--seed", type=int, help=_default(train.StayPretrainConfig, "seed"))
def pretrain(level, **options):
    """Pretrain the stay level (reconstruction), then the admission level (MCP + contrastive)."""
    _run(train.pretrain, train.LEVELS[level], **options)


@cli.command(name="evaluate")
@click.option("--task", type=click.Choice([*evaluate.TASKS, "all"]), required=True, help="Downstream task.")
@click.option("--data", type=PathOption, help=_default(evaluate.FinetuneConfig, "data"))
@click.option("--run", type=PathOption, help="Checkpoints in, eval/ and results.csv out. "
              + _default(evaluate.FinetuneConfig, "run"))
@click.option("--init", type=click.Choice(evaluate.INITS), help=_default(evaluate.FinetuneConfig, "init"))
@click.option("--seeds", type=click.IntRange(min=1), help=_default(evaluate.FinetuneConfig, "seeds"))
@click.option("--model", type=click.Choice(evaluate.PATIENT_MODELS), help="Patient-level sequence model. "
              + _default(evaluate.FinetuneConfig, "model"))
@click.option("--lr", type=RateList(), help="One learning rate for every level, or a grid (e.g. 1e-3,5e-3,2e-2) "
              "chosen per init on validation. [default: 5e-3 stay and admission, 5e-2 patient]")
@click.option("--probe", is_flag=True, default=None, help="Train only the head on the frozen encoder.")
@click.option("--batch-size", type=click.IntRange(min=1), help=_default(evaluate.FinetuneConfig, "batch_size"))
@click.option("--epochs", type=click.IntRange(min=1), help=_default(evaluate.FinetuneConfig, "epochs"))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
              help=_default(evaluate.FinetuneConfig, "device"))
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help=_default(evaluate.FinetuneConfig, "precision"))
@click.option("--label-fraction", type=FiniteRange(0, 1, min_open=True),
              help="Fine-tune on this share of the training labels (low-resource runs). "
              + _default(evaluate.FinetuneConfig, "label_fraction"))
@click.option("--labels", type=click.IntRange(min=4), help="Fine-tune on this many training examples "
              "(stratified), e.g. 50 for a low-label run.")
@click.option("--seed", type=int, help=_default(evaluate.FinetuneConfig, "seed"))
def evaluate_command(**options):
    """Fine-tune on downstream tasks (pretrained vs from scratch) and write metrics with bootstrap CIs."""
    _run(evaluate.evaluate, evaluate.FinetuneConfig, **options)


@cli.command(name="demo")
@click.option("--out", type=PathOption, help=_default(demo.DemoConfig, "out"))
@click.option("--patients", type=click.IntRange(min=50), help=_default(demo.DemoConfig, "patients"))
@click.option("--seed", type=int, help=_default(demo.DemoConfig, "seed"))
def demo_command(**options):
    """Synthetic cohort -> preprocess -> pretrain stay, admission -> evaluate every task, in minutes on a CPU."""
    _run(demo.demo, demo.DemoConfig, **options)


if __name__ == "__main__":
    cli()
