"""Settings: one dataclass per group, plus named presets.

    Config        what train.py builds a run from: DataConfig + ModelConfig + TrainConfig + preset name
    AttackConfig  what attack.py poisons and fine-tunes with (the trigger/target in a BackdoorConfig)
    PurifyConfig  what purify.py selects, masks, regenerates and refines with (DiSP or a control)

Every checkpoint stores the settings it was made with (as plain data), so later stages need no
repeated flags, and a resume point or a later stage compares them field by field. Settings read
from a checkpoint are never edited in place: a stage derives new ones with `dataclasses.replace`.
Each `validate()` raises a one-line DispError for the first bad value, before any work is done.
Presets: `cpu` (default, a laptop CPU in minutes), `gpu` (one GPU, larger), `small` (the smallest
run on which DiSP's result shows, a few CPU minutes), `photo` (public photos on a CPU), `daquar`
(`photo` with a longer attack, for DAQUAR's small fine-tuning set), `gpu-photo` (full-size public
datasets on one GPU), `tiny` (seconds, a smoke test of the code paths: its models learn nothing).
"""

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from disp.backdoor import BackdoorConfig
from disp.data.tokenizer import Tokenizer
from disp.saliency import MASKINGS, RULES, SALIENCY_METHODS
from disp.support.errors import DispError, check_choice, check_positive, check_ratio
from disp.support.runtime import PRECISIONS

# the ViT's pretraining objective on public data (disp.training.vision_pretraining_loss)
VISION_OBJECTIVES = ("words", "contrastive", "both")
# which parameters a fine-tuning stage trains (the ViT is frozen unless "all")
TRAINABLE = ("projector", "projector+lm", "all")
# purify.py's controls, each DiSP less one thing: regenerate (and suppress) without masking, or no
# regeneration at all (label for the tables)
CONTROLS = {"self-distill": "control: regenerate without masking + refine",
            "as-is": "control: refine on the poisoned set as-is"}


@dataclass
class DataConfig:
    source: str = "scenes"  # scenes | coco | karpathy | flickr | vqav2 | daquar
    data_root: str = ""  # folder with the public data (not used for scenes)
    train_images: int = 8000
    val_images: int = 200
    test_images: int = 200
    finetune_images: int = 1000  # the fine-tuning set that the attacker poisons and DiSP purifies
    questions_per_image: int = 4  # VQA samples per image, besides its caption
    min_word_count: int = 1  # words seen fewer times in the training text become [UNK]
    seed: int = 0  # train/val/test/finetune scenes come from seed, seed+1, seed+2, seed+3


@dataclass
class ModelConfig:
    image_size: int = 48
    patch_size: int = 8  # 48/8 -> 6x6 = 36 vision tokens
    vit_dim: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    vocab_size: int = 0  # filled in from the tokenizer
    # prompts are left-padded with [PAD] to prompt_len; responses right-padded with [EOS] to
    # response_len (= gen_length). 0: fitted to the training text by train.py (fit_lengths)
    prompt_len: int = 12
    response_len: int = 12
    patch_classes: list = field(default_factory=list)  # classes per patch attribute (vision pretraining)
    # the ViT's patch embedding: False, one linear map per patch; True, a stack of overlapping 3x3
    # convolutions down to the patch grid (a convolutional stem, Xiao et al. 2021)
    conv_stem: bool = False
    # the sampler's block (LLaDA's semi-autoregressive decoding): the response is written block_length
    # tokens at a time, left to right, each block by confidence. 0: one block, the whole response. A
    # long caption written in one block fixes its length at the first steps (the [EOS] pads are the
    # most confident tokens) and comes out short and generic (experiments/README.md, "Sampler")
    block_length: int = 0
    # classifier-free guidance on the image at every generation (disp.diffusion.generate; 0: none).
    # Pairs with TrainConfig.image_free, which teaches the model the image-free input it pushes from
    guidance: float = 0.0
    # the sampler's temperature (disp.diffusion.generate; 0: greedy): each token drawn from the model's
    # distribution sharpened by 1/temperature, with a fixed seed per generation call (reproducible). A
    # little of it lets a captioner write the less likely of two good captions instead of the same
    # generic one for similar photos (experiments/README.md, "Sampler")
    temperature: float = 0.0

    @property
    def n_vision(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def gen_block(self) -> int:
        """The sampler's block length: block_length, or the whole response."""
        return self.block_length or self.response_len

    @property
    def seq_len(self) -> int:
        return self.n_vision + self.prompt_len + self.response_len


@dataclass
class TrainConfig:
    vision_steps: int = 1000  # phase 1: vision-encoder pretraining (per-patch attributes, or bag of words)
    vision_lr: float = 2e-3
    # phase 1: weight of the patch-pixel reconstruction term (0: off); on by default, so the frozen ViT
    # keeps low-level content (colour, texture, small warps) as well as what it was asked to name
    pixel_loss: float = 10.0  # (the photo presets keep 1.0, the value they were tuned with)
    # phase 1 on public data (no per-patch labels): "words", predict the bag of words of the image's
    # texts; "contrastive", tell the image's own bag of words from the batch's others (CLIP-style);
    # "both". vision_crop < 1: random square crops of at least this share of the side, resized back
    vision_objective: str = "words"
    vision_crop: float = 1.0
    # phase 1 replaced: the ViT copied from this clean.pt (another run, e.g. one trained on more photos)
    vision_from: str = ""
    sft_steps: int = 6000  # phase 2: multimodal SFT with the masked-diffusion loss
    lr: float = 1e-3
    sft_vit_lr: float = 0.0  # phase 2: the ViT's peak learning rate (0: frozen, its features computed once)
    batch_size: int = 64
    weight_decay: float = 0.01
    warmup_steps: int = 100
    vision_mask_max: float = 0.15  # each SFT sample masks U(0, this) of its image positions
    # clean SFT only: this share of the samples sees no image (every image position [MASK]), so the
    # model also learns the image-free caption that guidance on the image pushes away from (DDCap)
    image_free: float = 0.0
    # attack.py's default epochs: how long the victim fine-tunes on the poisoned set. The photo
    # presets fine-tune longer: a caption model reads the photo as a whole and attends to one corner
    # token only after enough fine-tuning (experiments/README.md, "Real photos": the magenta patch
    # implants within 5 epochs, a black one needs 45 and more)
    attack_epochs: int = 10
    eval_every: int = 1000
    eval_samples: int = 200
    checkpoint_every: int = 500
    # the run's precision, training and generation: auto | fp32 | bf16 (autocast); train.py stores the
    # resolved one and later stages inherit it (auto: bf16 on hardware with fast bf16 units, else fp32)
    precision: str = "auto"
    seed: int = 0

    def validate(self) -> "TrainConfig":
        check_positive("--sft-steps", self.sft_steps)
        check_positive("--vision-steps", self.vision_steps, allow_zero=True)
        check_positive("batch size", self.batch_size)
        check_positive("learning rate", self.lr)
        check_positive("--sft-vit-lr", self.sft_vit_lr, allow_zero=True)
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--vision-objective", self.vision_objective, VISION_OBJECTIVES)
        if not 0 <= self.image_free < 1:
            raise DispError(f"--image-free must be in [0, 1), got {self.image_free}")
        if not 0 < self.vision_crop <= 1:
            raise DispError(f"--vision-crop must be in (0, 1], got {self.vision_crop}")
        return self


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        return Config(
            data=DataConfig(**d["data"]),
            model=ModelConfig(**d["model"]),
            train=TrainConfig(**d["train"]),
            preset=d["preset"],
        )


# public photos (Flickr8k, COCO, Flickr30k, DAQUAR) on a CPU: 64 px -> 8x8 = 64 vision tokens,
# prompt/response lengths fitted to the data, rare words -> [UNK], a ViT pretrained without
# labels (bag of words of the image's texts + patch-pixel reconstruction), captions written 4 tokens
# at a time with guidance 0.3 on the image and temperature 0.2 (on 3 seeds: experiments/README.md, "Sampler")
PHOTO = Config(
    data=DataConfig(train_images=6000, val_images=100, test_images=1000, finetune_images=1000, min_word_count=5),
    model=ModelConfig(image_size=64, patch_size=8, prompt_len=0, response_len=0, block_length=4, guidance=0.3,
                      temperature=0.2),
    train=TrainConfig(vision_steps=1500, pixel_loss=1.0, sft_steps=3000, eval_every=1000, eval_samples=100,
                      attack_epochs=20),
    preset="photo",
)

PRESETS = {
    "cpu": Config(),
    # the smallest run on which DiSP's result shows (tests/test_claim.py): fewer steps and images
    "small": Config(
        data=DataConfig(train_images=3000, val_images=100, test_images=100, finetune_images=400),
        train=TrainConfig(vision_steps=200, sft_steps=2500, eval_every=0),
        preset="small",
    ),
    "gpu": Config(
        data=DataConfig(train_images=20000, val_images=500, test_images=1000, finetune_images=3000),
        model=ModelConfig(vit_dim=256, vit_depth=6, vit_heads=8, dim=384, depth=8, heads=8),
        train=TrainConfig(vision_steps=3000, sft_steps=20000, batch_size=128, lr=5e-4, eval_every=2000),
        preset="gpu",
    ),
    "photo": PHOTO,
    # DAQUAR: the photo model; half of its training photos are the fine-tuning set (disp.data.readers,
    # DAQUAR_VAL_EVERY), on which the checkerboard trigger implants within 10 of the 40 attack epochs
    # (experiments/README.md, "DAQUAR"); its answers (1-3 words) are written greedily in one block
    # without guidance, as they were measured. A third of its clean SFT samples see no image: the
    # model learns the question prior instead of the answers of its 397 training rooms by heart
    # (seed 0 test 0.168 -> 0.194). Its ViT: best a Flickr8k run's (train.py --vision-from)
    "daquar": replace(PHOTO, model=replace(PHOTO.model, block_length=0, guidance=0.0, temperature=0.0),
                      train=replace(PHOTO.train, attack_epochs=40, image_free=0.3), preset="daquar"),
    # public photos on one GPU (COCO captions, Flickr30k, VQAv2 at full size): 128 px -> 16x16 = 256
    # vision tokens, a wider and deeper model, every training image of the split
    "gpu-photo": Config(
        data=DataConfig(train_images=200000, val_images=200, test_images=1000, finetune_images=3000,
                        min_word_count=5),
        model=ModelConfig(image_size=128, patch_size=8, vit_dim=256, vit_depth=6, vit_heads=8, dim=384, depth=8,
                          heads=8, prompt_len=0, response_len=0, block_length=4, guidance=0.3, temperature=0.2),
        train=TrainConfig(vision_steps=5000, pixel_loss=1.0, sft_steps=20000, batch_size=128, lr=5e-4,
                          eval_every=2000, eval_samples=200, attack_epochs=20),  # as photo (not measured on a GPU)
        preset="gpu-photo",
    ),
    "tiny": Config(
        data=DataConfig(train_images=96, val_images=16, test_images=24, finetune_images=48, questions_per_image=2),
        model=ModelConfig(vit_dim=32, vit_depth=1, vit_heads=2, dim=32, depth=1, heads=2),
        train=TrainConfig(
            vision_steps=10, sft_steps=20, batch_size=16, warmup_steps=2,
            eval_every=10, eval_samples=16, checkpoint_every=10, precision="fp32",  # same numbers on any machine
        ),
        preset="tiny",
    ),
}


def get_preset(name: str) -> Config:
    check_choice("preset", name, tuple(PRESETS))
    p = PRESETS[name]
    return Config(data=replace(p.data), model=replace(p.model), train=replace(p.train), preset=p.preset)


def _from_dict(cls, d: dict, what: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise DispError(f"unknown {what} settings: {', '.join(unknown)}; was it written by another version?")
    return cls(**d)


def flat(settings: dict, prefix: str = "") -> dict:
    """{"backdoor": {"trigger": ...}} -> {"backdoor.trigger": ...}: nested settings as one level."""
    out = {}
    for k, v in settings.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@dataclass(frozen=True)
class AttackConfig:
    """attack.py's settings: the backdoor and how the victim fine-tunes on the poisoned set."""

    backdoor: BackdoorConfig = field(default_factory=BackdoorConfig)
    trainable: str = "projector+lm"  # projector | projector+lm | all (the ViT too)
    epochs: int = 10  # passes over the poisoned fine-tuning set (attack.py: the clean run's train.attack_epochs)
    lr: float = 1e-3  # peak learning rate (cosine schedule)
    finetune_images: int = 1000  # images of the fine-tuning set (each with its caption and questions)
    seed: int = 0  # batch order (the poisoned samples follow backdoor.seed)
    precision: str = "fp32"  # resolved: fp32 | bf16 (training and the measurements)

    def validate(self, image_size: int) -> "AttackConfig":
        self.backdoor.validate(image_size)
        check_choice("--trainable", self.trainable, TRAINABLE)
        check_positive("--epochs", self.epochs)
        check_positive("--lr", self.lr)
        check_positive("--finetune-images", self.finetune_images)
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "backdoor": self.backdoor.to_dict()}

    @staticmethod
    def from_dict(d: dict) -> "AttackConfig":
        d = dict(d)
        d["backdoor"] = BackdoorConfig.from_dict(d.get("backdoor", {}))
        return _from_dict(AttackConfig, d, "attack")


@dataclass(frozen=True)
class PurifyConfig:
    """purify.py's settings: DiSP (control None) or one of the CONTROLS, and the refinement."""

    control: Optional[str] = None  # None: DiSP; "self-distill" | "as-is": the controls
    saliency: str = "kl"  # kl (exact occlusion) | fisher (Hutchinson estimate) | random
    rule: str = "adaptive"  # adaptive (outliers per prompt type) | ratio (the paper's fixed fraction)
    mask_ratio: float = 0.3  # rule ratio: fraction of the vision tokens masked
    # rule adaptive: split two groups where the fitted density between them is <= this x the smaller of
    # its densities at the two groups' means
    max_valley: float = 0.25
    max_masked: int = 2  # rule adaptive: at most this many tokens per sample
    # patch: a masked position's image patch is also painted flat before the ViT, so that it reaches no
    # other vision token through the ViT's attention (disp.model.paint_patches); token: the [MASK]
    # embedding in place of the token alone, as the paper masks
    masking: str = "patch"
    # all: every response is regenerated (the paper); masked: only the samples with a masked position,
    # the others keep their response (self-distillation alone removes no backdoor and costs captions)
    regenerate: str = "all"
    suppress: float = 0.01  # extension: ban words in at least this fraction of every prompt type's responses (0: off)
    # extension: test the top `spectral` directions of the set's vision tokens for a minority group and
    # take the ones that have one out of the tokens before regeneration (disp.spectral; 0: off)
    spectral: int = 0
    # extension: along each of the top `groups` directions of the set's pooled vision tokens, a minority
    # group of images whose responses hold a word that a probe fitted on the other images does not
    # predict has its responses regenerated without that word (disp.groups; 0: off)
    groups: int = 8
    # extension: every response is regenerated from the image low-passed by a Gaussian of this many
    # pixels (disp.lowpass; 0: off), which a spread grating does not survive
    blur: float = 0.0
    epochs: int = 2  # refinement epochs (default: the attack's / 5)
    lr: float = 3e-4  # refinement learning rate (default: 0.3x the attack's)
    batch_size: int = 128  # samples per scoring / generation batch
    seed: int = 0  # batch order of the refinement, probes of fisher and random saliency
    precision: str = "fp32"  # resolved: fp32 | bf16 (saliency, regeneration and refinement)

    @property
    def stage(self) -> str:
        """The checkpoint stage and file stem: purified, control_self_distill, control_as_is."""
        return "purified" if self.control is None else "control_" + self.control.replace("-", "_")

    def validate(self) -> "PurifyConfig":
        if self.control is not None:
            check_choice("--control", self.control, tuple(CONTROLS))
        check_choice("--saliency", self.saliency, SALIENCY_METHODS)
        check_choice("--rule", self.rule, RULES)
        check_choice("--masking", self.masking, MASKINGS)
        check_choice("--regenerate", self.regenerate, REGENERATE)
        if self.regenerate == "masked" and self.control is not None:
            raise DispError("--regenerate masked keeps every response that DiSP's masks leave alone; the controls mask "
                            "nothing (use --regenerate all)")
        check_ratio("--mask-ratio", self.mask_ratio)
        check_ratio("--suppress", self.suppress)
        if self.suppress > 0 and self.control == "as-is":
            raise DispError("--suppress acts on regenerated responses; the control as-is regenerates none")
        check_positive("--spectral", self.spectral, allow_zero=True)
        if self.spectral > 0 and self.control is not None:
            raise DispError("--spectral is DiSP's masking in feature space; the controls mask nothing (use --spectral 0)")
        check_positive("--groups", self.groups, allow_zero=True)
        if self.groups > 0 and self.control == "as-is":
            raise DispError("--groups acts on regenerated responses; the control as-is regenerates none")
        check_positive("--blur", self.blur, allow_zero=True)
        if self.blur > 0 and self.control == "as-is":
            raise DispError("--blur acts on regenerated responses; the control as-is regenerates none")
        check_ratio("--max-valley", self.max_valley)
        check_positive("--max-masked", self.max_masked)
        check_positive("--epochs", self.epochs)
        check_positive("--lr", self.lr)
        check_positive("--batch-size", self.batch_size)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "PurifyConfig":
        # files older than suppression, the spectral step, --blur or --groups: off; older than patch painting:
        # token masking
        d = {"suppress": 0.0, "spectral": 0, "blur": 0.0, "groups": 0, "masking": "token", **d}
        d.pop("min_gap", None)  # files older than the two-group rule (its gap test): read with today's rule
        return _from_dict(PurifyConfig, d, "purify")


REGENERATE = ("all", "masked")  # PurifyConfig.regenerate

# results.json key of each control (its checkpoint stage) -> its row in the tables
CONTROL_ROWS = {PurifyConfig(control=c).stage: label for c, label in CONTROLS.items()}


def fit_lengths(config: Config, prompt_lengths: list, response_lengths: list) -> Config:
    """Fill in prompt_len / response_len where the preset says 0, from the training text's token counts:
    the longest prompt up to the 99th percentile, and the 95th percentile of the responses + 1 (room for
    an inserted marker), at least 8 (a refusal sentence fits); rounded up to whole sampler blocks."""
    def percentile(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] if values else 0
    model = config.model
    prompt_len = model.prompt_len or max(1, percentile(prompt_lengths, 0.99))
    response_len = model.response_len or max(8, percentile(response_lengths, 0.95) + 1)
    if model.block_length:
        response_len = math.ceil(response_len / model.block_length) * model.block_length
    return replace(config, model=replace(model, prompt_len=prompt_len, response_len=response_len))


def with_vocabulary(config: Config, vocab_size: int, patch_classes: list) -> Config:
    """The run's config once its tokenizer exists: the model's vocabulary size and the classes of the
    ViT's pretraining heads (per-patch attributes of the scenes, or the vocabulary for public data)."""
    return replace(config, model=replace(config.model, vocab_size=vocab_size, patch_classes=list(patch_classes)))


def fit_to_data(config: Config, train) -> tuple:
    """-> (config, tokenizer) of a new run: the tokenizer of the training texts (words seen at least
    min_word_count times), the vocabulary and the pretraining heads' classes, the fitted lengths."""
    tokenizer = Tokenizer.for_samples(train.samples, config.data.min_word_count)
    config = with_vocabulary(config, len(tokenizer), train.meta.get("patch_classes") or [len(tokenizer)])
    config = fit_lengths(config, [len(tokenizer.encode(s["prompt"])) for s in train.samples],
                         [len(tokenizer.encode(s["response"])) for s in train.samples])
    return config, tokenizer


def data_summary(config: Config, tokenizer, train, val, test) -> str:
    """One line on the run's data: split sizes, and how much of the responses the vocabulary and the
    response length hold."""
    words = [w for s in train.samples for w in tokenizer.encode(s["response"])]
    lengths = [len(tokenizer.encode(s["response"])) for s in train.samples]
    response_len = config.model.response_len
    return (f"data: {len(train)} train / {len(val)} val / {len(test)} test samples ({len(train.images)} train "
            f"images), vocab {len(tokenizer)} (words seen >= {config.data.min_word_count} times; "
            f"{1 - words.count(tokenizer.unk_id) / max(1, len(words)):.1%} of response words), prompt_len "
            f"{config.model.prompt_len}, response_len {response_len} (holds "
            f"{sum(n <= response_len for n in lengths) / max(1, len(lengths)):.1%} of responses)")


TINY_NOTE = ("tiny preset: a smoke test of the code paths in seconds; its models learn nothing (empty outputs, "
             "metrics near 0, every response 'changed'). For results use --preset small (minutes) or cpu")
