"""Configuration: dataclasses for the data, the model and training, plus named presets.

A checkpoint stores the full config it was trained with (as plain data), so later stages need no
repeated flags. Presets: `cpu` (default, a laptop CPU in minutes), `gpu` (one GPU, larger),
`tiny` (seconds, for tests).
"""

from dataclasses import asdict, dataclass, field, replace

from disp.support.errors import DispError


@dataclass
class DataConfig:
    source: str = "scenes"  # scenes | coco | karpathy | flickr | vqav2
    data_root: str = ""  # folder with the public data (not used for scenes)
    train_images: int = 8000
    val_images: int = 200
    test_images: int = 200
    finetune_images: int = 1000  # the fine-tuning set that the attacker poisons and DiSP purifies
    questions_per_image: int = 4  # VQA samples per image, besides its caption
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
    prompt_len: int = 12  # prompts are left-padded with [PAD] to this length
    response_len: int = 12  # responses are right-padded with [EOS] to this length (= gen_length)
    patch_classes: list = field(default_factory=list)  # classes per patch attribute (vision pretraining)

    @property
    def n_vision(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.n_vision + self.prompt_len + self.response_len


@dataclass
class TrainConfig:
    vision_steps: int = 300  # phase 1: vision-encoder pretraining (per-patch attributes)
    vision_lr: float = 2e-3
    sft_steps: int = 6000  # phase 2: multimodal SFT with the masked-diffusion loss (ViT frozen)
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    warmup_steps: int = 100
    vision_mask_max: float = 0.15  # each SFT sample masks U(0, this) of its image positions
    eval_every: int = 1000
    eval_samples: int = 200
    checkpoint_every: int = 500
    # training: auto | fp32 | bf16 (autocast); train.py stores the resolved one (auto: bf16 on fast-bf16
    # hardware, where a cpu-preset step ran 2.2x faster on our 2-core CPU, else fp32)
    precision: str = "auto"
    seed: int = 0


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


PRESETS = {
    "cpu": Config(),
    "gpu": Config(
        data=DataConfig(train_images=20000, val_images=500, test_images=1000, finetune_images=3000),
        model=ModelConfig(vit_dim=256, vit_depth=6, vit_heads=8, dim=384, depth=8, heads=8),
        train=TrainConfig(vision_steps=3000, sft_steps=20000, batch_size=128, lr=5e-4, eval_every=2000),
        preset="gpu",
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
    if name not in PRESETS:
        raise DispError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return Config(data=replace(p.data), model=replace(p.model), train=replace(p.train), preset=p.preset)
