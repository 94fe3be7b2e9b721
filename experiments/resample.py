"""Give a run that attack.py finished another sampler, without training anything again.

    python experiments/resample.py --from runs/s0 --to runs/s0-t02 --temperature 0.2
    python purify.py --run-dir runs/s0-t02 && python evaluate.py --run-dir runs/s0-t02

The sampler (guidance on the image, temperature) is stored in the model's config and every stage
reads it from there. It is not part of training: train.py's evaluations draw their own noise
(disp.evaluation.sampling_noise), so the weights that `train.py --temperature T` writes are the
weights that it writes without. This copies the run's clean.pt and backdoored.pt into --to with the
new setting, their weights untouched, and the files attack.py wrote beside them (the poisoned set,
its manifest, attack_metrics.json), with backdoored.pt's record of the clean.pt it came from made
anew; purify.py and evaluate.py then run on --to as on a run trained with that sampler. The metrics
stored by train.py and attack.py stay the old sampler's (evaluate.py measures every model again).
"""

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: find the disp package

from disp.support import checkpoint  # noqa: E402
from disp.support.errors import DispError, check_positive, friendly_errors  # noqa: E402
from disp.support.files import sha256  # noqa: E402

ATTACK_FILES = ("poisoned_train.pt", "poison_manifest.json", "attack_metrics.json")


def resample(source: Path, target: Path, sampler: dict):
    if target.exists():
        raise DispError(f"{target} exists: give --to a new folder (the copies would mix with its files)")
    loaded = {name: checkpoint.load(source / name, [stage])
              for name, stage in (("clean.pt", "clean"), ("backdoored.pt", "backdoored"))}
    checkpoint.check_made_from(loaded["backdoored.pt"][3], source / "backdoored.pt", source,
                               ["clean.pt", "poisoned_train.pt", "poison_manifest.json"])
    target.mkdir(parents=True)
    for name in ATTACK_FILES:
        shutil.copy2(source / name, target / name)
    for name, (model, tokenizer, config, state) in loaded.items():
        config = replace(config, model=replace(config.model, **sampler))
        model.cfg = config.model
        made_from = dict(state["made_from"])
        if name == "backdoored.pt":
            made_from["clean.pt"] = sha256(target / "clean.pt")
        checkpoint.save(target / name, stage=state["stage"], model=model, config=config, tokenizer=tokenizer,
                        step=state["step"], rng=state["rng"], made_from=made_from,
                        extra={**state["extra"], "resampled_from": str(source / name), "sampler": sampler})
    print(f"wrote {target}: clean.pt and backdoored.pt of {source} with {sampler}, and {', '.join(ATTACK_FILES)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, help="a run directory that attack.py finished")
    p.add_argument("--to", dest="target", required=True, help="the new run directory (must not exist)")
    p.add_argument("--temperature", type=float, default=None, help="the sampler's temperature (0: greedy)")
    p.add_argument("--guidance", type=float, default=None, help="the sampler's guidance on the image (0: none)")
    args = p.parse_args(argv)
    sampler = {k: v for k, v in (("temperature", args.temperature), ("guidance", args.guidance)) if v is not None}
    if not sampler:
        raise DispError("nothing to change: give --temperature and/or --guidance")
    for k, v in sampler.items():
        check_positive(f"--{k}", v, allow_zero=True)
    torch.set_grad_enabled(False)
    resample(Path(args.source), Path(args.target), sampler)


if __name__ == "__main__":
    with friendly_errors():
        main()
