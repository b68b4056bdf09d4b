"""medhmp: hierarchical multimodal pretraining on electronic health records (MedHMP, EMNLP 2023).

Usage: python medhmp.py demo, or stage by stage: synth --out data/raw; preprocess --raw data/raw;
pretrain --level stay; pretrain --level admission; evaluate --task all [--model all]; embed --level
stay --out stays.npz. Pretraining runs on several devices or machines under torchrun: `torchrun
--nproc-per-node N -- medhmp.py pretrain ...` (docs/distributed.md). Options default to None: the
command line only parses and delegates, every default lives in a config dataclass.
"""
import dataclasses
import functools
import math
from pathlib import Path

import click

import demo
import embed
import evaluate
import paper_tables
import runtime
import synthetic
import train
from folders import WRITE_ERRNOS, InputError, cannot_write, sigterm_as_interrupt
from preprocessing import pipeline


def _run(function, config_class, **options):
    """Build the config from the given options (None = not given) and run; bad input is one line."""
    cfg = dataclasses.replace(config_class(), **{k: v for k, v in options.items() if v is not None})
    try:
        with sigterm_as_interrupt():   # SIGTERM cleans up as Ctrl-C does (no .tmp left behind)
            return function(cfg)
    except (InputError, runtime.NonFiniteLoss, runtime.RankFailure) as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:   # a write failed whatever the file (full disk, read-only): one line
        if err.errno not in WRITE_ERRNOS:
            raise
        raise click.ClickException(str(cannot_write(Path(err.filename or "."), err,
                                                    "place to write"))) from None


def _option(name: str, config_class, text: str = "", **kw):
    """--name, defaulting to None: the config dataclass holds the default (shown); type TYPES[name]
    unless given."""
    default = getattr(config_class(), name.lstrip("-").replace("-", "_"))
    return click.option(name, help=f"{text} [default: {default}]".lstrip(),
                        **{"type": TYPES.get(name), **kw})


def _options(config_class, *names: str):
    """`_option` for each of `names`, shown in this order, each with the type TYPES gives it and no
    other text."""
    def add(function, name):
        return _option(name, config_class)(function)
    return lambda function: functools.reduce(add, names[::-1], function)


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every range comparison)."""

    def convert(self, value, param, ctx):
        if not math.isfinite(number := super().convert(value, param, ctx)):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


PathOption, PositiveFloat = click.Path(path_type=Path), FiniteRange(min=0, min_open=True)
Count = click.IntRange(min=1)
Seed = click.IntRange(0, runtime.SEED_MAX)   # pretrain, evaluate, demo: what their generators take
TYPES = {"--seed": int, "--device": click.Choice(runtime.DEVICES),
         "--precision": click.Choice(runtime.PRECISIONS),
         **dict.fromkeys("--batch-size --epochs --seeds --d-model --patients".split(), Count),
         "--out": PathOption, "--data": PathOption, "--run": PathOption,
         **dict.fromkeys(("--num-workers", "--patience"), click.IntRange(0))}


class RateList(click.ParamType):
    """One learning rate or a comma-separated grid of them, each a positive finite number."""
    name = "LR[,LR...]"

    def convert(self, value, param, ctx):
        rates = value if isinstance(value, tuple) else str(value).split(",")  # a tuple: converted
        return tuple(PositiveFloat.convert(v, param, ctx) for v in rates)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """MedHMP: pretrain on MIMIC-style EHR extracts, then evaluate on eight downstream tasks."""


@cli.command()
@click.option("--out", type=PathOption, required=True, help="Folder to write the extract to.")
@_options(synthetic.SynthConfig, "--patients", "--seed")
@_option("--layout", synthetic.SynthConfig, type=click.Choice(synthetic.LAYOUTS))
@_option("--event-scale", synthetic.SynthConfig, "Chart rows per stay-hour multiplier.",
         type=FiniteRange(min=0.1))
@_option("--meds-etl", synthetic.SynthConfig, "meds: MIMIC_IV_MEDS lab codes.",
         type=click.Choice(synthetic.MEDS_ETLS))
@_option("--strength", synthetic.SynthConfig, "How strongly the latents drive the data and labels.",
         type=FiniteRange(min=0))
@_option("--label-noise", synthetic.SynthConfig, "Share of each label drawn at its base rate.",
         type=FiniteRange(0, 1))
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace an extract in OUT that synth did not write.")
def synth(**options):
    """Write a synthetic cohort (MIMIC-III, MIMIC-IV, diagnosis extract or MEDS) of a latent model
    (OUT/latents/)."""
    done = _run(synthetic.synthesize, synthetic.SynthConfig, **options)
    click.echo("wrote {out}: {patients} patients, {admissions} admissions, {stays} ICU "
               "stays".format(**done))


@cli.command()
@_option("--raw", pipeline.PreprocessConfig, "Folder of CSV extracts, or a MEDS root.",
         type=PathOption)
@click.option("--meds-profile", help="MEDS root: a built-in profile (docs/meds.md) or a profile "
              "file. [default: from metadata/dataset.json]")
@click.option("--notes", type=PathOption,
              help="Note table or folder (NOTEEVENTS*, MIMIC-IV-Note discharge).")
@_option("--text-model", pipeline.PreprocessConfig,
         "'hashing', a local Hugging Face folder, or a hub name.")
@click.option("--limit-patients", type=Count, help="Keep a deterministic sample of N patients.")
@click.option("--vocab-from", type=PathOption,
              help="Reuse the code vocabularies and fitted features of another processed folder.")
@_option("--icd", pipeline.PreprocessConfig, "ICD systems (9: the paper's).",
         type=click.Choice(pipeline.ICD_OPTIONS))
@_options(pipeline.PreprocessConfig, "--out", "--text-device", "--seed")
def preprocess(**options):
    """Build the processed hierarchical dataset (features, codes, notes, labels, splits)."""
    _run(pipeline.preprocess, pipeline.PreprocessConfig, **options)


@cli.command()
@click.option("--level", type=click.Choice(list(train.LEVELS)), required=True,
              help="Pretraining stage.")
@_options(train.StayPretrainConfig, "--data", "--run")
@click.option("--epochs", type=Count, help="[default: 200 stay, 300 admission (paper)]")
@click.option("--max-steps", type=Count, help="Stop after this many optimiser steps.")
@click.option("--batch-size", type=Count,
              help="The global batch: under torchrun each of its N processes takes 1/N of it. "
                   "[default: 128 stay, 4096 admission (paper)]")
@click.option("--lr", type=PositiveFloat, help="[default: 5e-4 stay, 2e-5 admission (paper)]")
@_option("--patience", train.StayPretrainConfig,
         "Stop after N passes without improvement (0: never).")
@click.option("--resume", is_flag=True, default=None, help="Continue from RUN/<level>.pt.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing RUN/<level>.pt.")
@_options(train.StayPretrainConfig, "--device", "--precision", "--num-workers", "--d-model")
@_option("--seed", train.StayPretrainConfig, type=Seed)
def pretrain(level, **options):
    """Pretrain the stay level (reconstruction), then the admission level (MCP + contrastive); on N
    devices: torchrun --nproc-per-node N -- medhmp.py pretrain ... (docs/distributed.md)."""
    _run(train.pretrain, train.LEVELS[level], **options)


@cli.command(name="evaluate")
@click.option("--task", type=click.Choice([*evaluate.TASKS, "all"]),
              help="Downstream task (or --labels-from).")
@click.option("--labels-from", type=PathOption,
              help="A MEDS label folder (or file) as one custom binary task (docs/meds.md).")
@click.option("--level", type=click.Choice(evaluate.LEVELS),
              help="--labels-from: the task's level. [default: inferred from the times]")
@click.option("--task-name", help="--labels-from: the task's name. [default: meds-<folder name>]")
@_options(evaluate.FinetuneConfig, "--data", "--run")
@_option("--init", evaluate.FinetuneConfig, type=click.Choice(evaluate.INITS))
@_option("--model", evaluate.FinetuneConfig, "all: the paper's tables.",
         type=click.Choice([*evaluate.MODELS, "all"]))
@click.option("--lr", type=RateList(),
              help="One learning rate for every level, or a grid (e.g. 1e-3,5e-3,2e-2) chosen per "
                   "init on validation. [default: 5e-3 stay and admission, 5e-2 patient]")
@click.option("--probe", is_flag=True, default=None,
              help="Train only the head on the frozen encoder.")
@_option("--label-fraction", evaluate.FinetuneConfig, "Train on this share of the labels.",
         type=FiniteRange(0, 1, min_open=True))
@_option("--labels", evaluate.FinetuneConfig, "Or this many, stratified.",
         type=click.IntRange(min=4))
@_options(evaluate.FinetuneConfig, "--seeds", "--batch-size", "--epochs", "--device", "--precision")
@_option("--seed", evaluate.FinetuneConfig, type=Seed)
def evaluate_command(**options):
    """Fine-tune on downstream tasks and write metrics with CIs; --model all: the paper's Tables 1-3
    (RUN/tables/)."""
    if (options["task"] is None) == (options["labels_from"] is None):
        raise click.ClickException("give --task or --labels-from (one of them)")
    if options["labels_from"] is not None and options["model"] == "all":
        raise click.ClickException("--model all builds the paper's tables of the built-in tasks; "
                                   "with --labels-from name one model")
    _run(paper_tables.tables if options["model"] == "all" else evaluate.evaluate,
         evaluate.FinetuneConfig, **options)


@cli.command(name="embed")
@click.option("--level", type=click.Choice(list(embed.LEVELS)), required=True,
              help="Rows (README: Pretrained representations).")
@_option("--out", embed.EmbedConfig,
         "A .npz file: embeddings (N, D), subject_id, hadm_id, stay_id, split, info.")
@_option("--init", embed.EmbedConfig, "RUN/admission.pt's encoder, or RUN/stay.pt's.",
         type=click.Choice(embed.INITS))
@_options(embed.EmbedConfig, "--data", "--run", "--batch-size", "--device")
def embed_command(**options):
    """Write the pretrained vector of every stay, admission or patient, with its ids and split, for
    your models."""
    _run(embed.embed, embed.EmbedConfig, **options)


@cli.command(name="demo")
@_option("--out", demo.DemoConfig)
@_option("--seed", demo.DemoConfig, type=Seed)
@_option("--patients", demo.DemoConfig, type=click.IntRange(min=50))
@click.option("--overwrite", is_flag=True, default=None,
              help="Replace checkpoints, processed folders and extracts in OUT that demo did not "
                   "write.")
def demo_command(**options):
    """Synthetic cohort -> preprocess -> pretrain (and a shuffled control) -> every task, in minutes
    on a CPU."""
    _run(demo.demo, demo.DemoConfig, **options)


if __name__ == "__main__":
    cli()
