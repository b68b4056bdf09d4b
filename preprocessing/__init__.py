"""Preprocessing: from the CSV tables of an extract to the processed folder that everything else
reads.

Usage: `python medhmp.py preprocess --raw RAW --out data/processed`, or in Python
`from preprocessing.pipeline import PreprocessConfig, preprocess`. The one place that reads raw
extracts (MIMIC-III, MIMIC-IV, a diagnosis extract); pretraining and evaluation only read its
output, through `data.load_processed`, and never import this package. Its modules, lowest first:
    tables    finding and reading CSV tables fast, in bounded memory; vectorised parsers
    extract   the raw tables of each layout as arrays with canonical columns; events streamed per
              stay-hour
    features  FIDDLE-style features, code vocabularies, note embeddings (fitted on the training
              split)
    cohorts   task cohorts and labels, patient sampling, the patient-level split
    build     one extract -> the arrays of a processed folder, in memory (the steps in
              docs/preprocessing.md)
    pipeline  the entry point: config, staging and writing the folder, the printed attrition
Each builds on the ones above it and on `data` (the format it writes, shared helpers) and `folders`.
The package imports nothing here, so `preprocessing.tables` can be imported without torch.
"""
