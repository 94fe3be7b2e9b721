"""Support code the method does not depend on for its meaning: files, errors, devices, reports.

    files.py        atomic writes and safe (weights_only) loads of every file the project touches
    checkpoint.py   a stage's checkpoint: weights + config + tokenizer + settings, provenance checks
    stage.py        what every stage repeats: parent checkpoint, resume point, its files as one unit
    errors.py       DispError and the one-line error wrapper of the scripts
    runtime.py      device choice, precision (fp32 / bf16 autocast), seeding
    distributed.py  data-parallel helpers for torchrun (no-ops in a single process)
    figures.py      PNG figures;  report.py  markdown tables
"""
