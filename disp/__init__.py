"""disp: DiSP (Diffusion Self-Purification) on a small multimodal masked diffusion language model.

The method, in the order a run meets it:

    config.py        every group of settings as a dataclass, and the named presets
    model.py         ViT encoder -> MLP projector -> text transformer; [MASK] at chosen image positions
    diffusion.py     LLaDA's forward process, its SFT loss, and the sampler (generate)
    training.py      vision pretraining and the masked-diffusion fine-tuning loop
    backdoor.py      the attack: triggers, targets, poisoning, attack success rate
    saliency.py      DiSP's vision-token saliency and the rules that choose the tokens to mask
    suppression.py   our extension: the words a poisoned set's responses hold whatever is asked
    purification.py  DiSP's steps: select, regenerate under masking, suppress, refine
    evaluation.py    generating over a dataset and scoring it
    test_time.py     masking at inference only, on the backdoored model (evaluate.py's ablations)
    metrics.py       BLEU-4, CIDEr-D, VQA accuracy

Beneath it, `disp.data` (where samples come from and how they become tensors) and `disp.support`
(files, checkpoints, a stage's plumbing, errors, devices, data-parallel helpers, figures, reports).
The four scripts at the repository root (train.py, attack.py, purify.py, evaluate.py) tell the
experiment's story.
"""
