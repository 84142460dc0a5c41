"""Fine-tuning configs below the stages: the LoRA / projector / dtype fields once, and the `train:` section.

- `FineTuneFields`: the fields every fine-tuning config of csr shares (LoRA, the projector, the load
  dtype, activation checkpointing), with one `lora_config()`. Mixed into `TrainConfig` (DPO, stage 4)
  and `csr.vig.train.SelectiveSFTConfig` (VIG-selective SFT); listed first among the bases so its
  defaults win over TRL's.
- `TrainConfig`: the recipe's `train:` section, `trl.DPOConfig` with CSR's defaults.

Every `trl.DPOConfig` / `transformers.TrainingArguments` field is valid in a recipe; `TrainConfig` only
overrides defaults (to the paper's, arXiv 2405.14622 §4 and appendix) and adds the LoRA and projector
fields. Where the authors' released script (`scripts/run_train.sh`) differs, the help says so.

This module sits beside `csr.config`, below the stage packages: `csr.config` reads the train
section's keys from here without importing a stage.

Notes on the library versions this was written against (TRL 1.16, transformers 5.23):
- `warmup_ratio` is gone from TrainingArguments: `warmup_steps` takes a float in [0, 1) as a
  fraction of the total steps, so the paper's 3% warmup is `warmup_steps: 0.03`.
- `gradient_checkpointing` is a deprecated alias of `activation_checkpointing`; TRL's default of
  `True` for the old name makes every plain `DPOConfig()` warn. Here the old name defaults to None
  (no warning) and the new one is resolved in `__post_init__`.
- TRL's `disable_dropout=True` also zeroes LoRA's own dropout; it defaults to False here so the
  paper's `lora_dropout=0.05` is real (LLaVA's own layers have dropout 0).
"""

from dataclasses import dataclass, field

from trl import DPOConfig

# LoRA on every linear layer of the language model, never the vision tower or the projector.
# PEFT matches a string `target_modules` as a full regex against each module's qualified name.
LM_LINEAR_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class FineTuneFields:
    """LoRA, projector, load-dtype and checkpointing fields of a `TrainingArguments` subclass.

    Defaults are the paper's and LLaVA-1.5's LoRA recipe (the same numbers): r 128, alpha 256,
    dropout 0.05 on the language model's linear layers.
    """

    # ---- LoRA ---------------------------------------------------------------------------------------
    lora_r: int = field(default=128, metadata=_help("LoRA rank (paper and LLaVA-1.5's LoRA recipe: 128)."))
    lora_alpha: int = field(default=256, metadata=_help(
        "LoRA alpha; the update is scaled by alpha/r (paper and LLaVA-1.5's LoRA recipe: 256)."))
    lora_dropout: float = field(default=0.05, metadata=_help(
        "Dropout on LoRA's input (paper and LLaVA-1.5's LoRA recipe: 0.05)."))
    lora_target_modules: str | list[str] = field(default=LM_LINEAR_REGEX, metadata=_help(
        "Modules that get LoRA: a regex matched against full module names, or a list of name "
        "suffixes. Default: every linear layer of the language model, never the vision tower "
        "(paper)."))

    # ---- Projector ------------------------------------------------------------------------------------
    train_projector: bool = field(default=False, metadata=_help(
        "With LoRA, also train the vision-language projector (fully, not LoRA). Off by default; the official "
        "LLaVA-based DPO script trains it (mm_projector_lr 2e-5). It trains as a PEFT `modules_to_save` "
        "copy, so DPO's adapters-off reference still uses the round's original projector; `csr merge` "
        "folds the trained copy in. Full fine-tuning (`csr vig train` use_lora=false) always trains it."))
    projector_module: str = field(default="auto", metadata=_help(
        "Name of the projector module. auto: the model class's own (csr.models.SUPPORTED_CLASSES: "
        "multi_modal_projector for LLaVA and LLaVA-NeXT, visual.merger for Qwen2.5-VL)."))

    # ---- Precision and memory ---------------------------------------------------------------------
    model_dtype: str = field(default="auto", metadata=_help(
        "Dtype the model's weights are loaded in for training. auto: bfloat16 with bf16 on (as "
        "the official LLaVA-based script), float16 with fp16, else float32. The LoRA weights stay "
        "float32 either way.", choices=MODEL_DTYPES))
    activation_checkpointing: bool | None = field(default=None, metadata=_help(
        "Recompute activations in the backward pass to save memory. None: on, as the official "
        "script (`--gradient_checkpointing True`), unless the deprecated `gradient_checkpointing` "
        "is set. Turn off for tiny models on CPU (faster)."))
    gradient_checkpointing: bool | None = field(default=None, metadata=_help(
        "Deprecated alias of activation_checkpointing (transformers 5); used only when "
        "activation_checkpointing is not set."))

    def __post_init__(self):
        # The paper's default for checkpointing, applied only when neither name was set, so an
        # explicit `gradient_checkpointing: false` (the deprecated name) still turns it off.
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(f"train.model_dtype={self.model_dtype!r} is not one of {', '.join(MODEL_DTYPES)}.")
        # values a run would only trip over once training starts: refused when the config is built
        checks = [("lora_r", self.lora_r >= 1, "must be >= 1"), ("lora_alpha", self.lora_alpha > 0, "must be > 0"),
                  ("lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"train.{key}={getattr(self, key)!r} {why}.")
        super().__post_init__()  # the TrainingArguments subclass this is mixed into

    def resolved_model_dtype(self) -> str:
        """The dtype name the model is loaded in for training (see `model_dtype`)."""
        if self.model_dtype != "auto":
            return self.model_dtype
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"

    def lora_config(self):
        """The `peft.LoraConfig` this config describes (projector as `modules_to_save` if trained)."""
        from peft import LoraConfig

        if self.train_projector and self.projector_module == "auto":
            raise ValueError("projector_module='auto' must be resolved from the model class first "
                             "(csr.models.SUPPORTED_CLASSES; csr.train.trainer.build_trainer does), or named.")

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            modules_to_save=[self.projector_module] if self.train_projector else None,
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass
class TrainConfig(FineTuneFields, DPOConfig):
    """`trl.DPOConfig` with the paper's DPO defaults and the shared fine-tuning fields (`FineTuneFields`)."""

    # ---- DPO (paper §4: sigmoid loss, beta 0.1, summed log-probs) --------------------------------
    learning_rate: float = field(default=1e-7, metadata=_help(
        "Peak learning rate of the LoRA weights (paper and official script: 1e-7)."))
    beta: float = field(default=0.1, metadata=_help(
        "DPO beta: strength of the pull toward the reference (paper: 0.1)."))
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata=_help(
        "DPO loss; any TRL loss_type (paper: sigmoid, the original DPO loss on summed log-probs)."))

    # ---- Schedule ---------------------------------------------------------------------------------
    lr_scheduler_type: str = field(default="cosine", metadata=_help(
        "Learning-rate schedule (paper and official script: cosine)."))
    warmup_steps: float = field(default=0.03, metadata=_help(
        "Linear warmup: an integer number of steps, or a float in [0, 1) as a fraction of the total "
        "steps (paper: 3% = 0.03; transformers 5 dropped `warmup_ratio`)."))
    num_train_epochs: float = field(default=1.0, metadata=_help(
        "Passes over the round's pairs (paper: 1)."))
    per_device_train_batch_size: int = field(default=1, metadata=_help(
        "Pairs per device per forward (official script: 1; each pair is a chosen and a rejected "
        "sequence, so the forward batch is twice this)."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Forwards per optimizer step (official script: 1, on 8 GPUs: 8 pairs a step)."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (official script: 0)."))

    # ---- Precision and memory ------------------------------------------------------------------
    bf16: bool | None = field(default=True, metadata=_help(
        "bf16 mixed precision (paper: bf16). The train stage turns it off, with a logged note, "
        "when no CUDA device is present."))
    disable_dropout: bool = field(default=False, metadata=_help(
        "Zero every dropout in the model. TRL defaults to True, which also zeroes LoRA's dropout; "
        "False keeps the paper's lora_dropout (LLaVA's own layers have dropout 0)."))
    max_length: int | None = field(default=1024, metadata=_help(
        "Longest prompt + response in tokens, image tokens included (official: model_max_length "
        "1024; LLaVA-1.5 spends 576 of them on the image). None: no truncation."))

    # ---- Logging and checkpoints ---------------------------------------------------------------
    logging_steps: float = field(default=1, metadata=_help(
        "Log loss and reward margins/accuracies every N optimizer steps (official script: 1)."))
    save_steps: float = field(default=100, metadata=_help(
        "Write a resumable checkpoint-N folder every N steps (official script: 100)."))
    save_total_limit: int | None = field(default=1, metadata=_help(
        "Checkpoint folders kept while training (official script: 1)."))
    keep_checkpoints: bool = field(default=False, metadata=_help(
        "Keep the checkpoint-N folders (adapter + optimizer state) once the stage is done. Off: "
        "they are resume points only and are deleted after the final adapter is saved."))

    # ---- Projector -------------------------------------------------------------------------------
    projector_learning_rate: float = field(default=2e-5, metadata=_help(
        "Peak learning rate of the projector when train_projector is on (official: mm_projector_lr 2e-5)."))

    def __post_init__(self):
        # values a run would only trip over after generate, score and pairs: refused when the recipe loads
        checks = [("learning_rate", self.learning_rate > 0, "must be > 0"), ("beta", self.beta > 0, "must be > 0"),
                  ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "must be >= 1"),
                  ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "must be >= 1"),
                  ("num_train_epochs", self.num_train_epochs > 0 or self.max_steps > 0, "must be > 0"),
                  ("max_length", self.max_length is None or self.max_length >= 1, "must be >= 1 or null")]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"train.{key}={getattr(self, key)!r} {why}.")
        super().__post_init__()  # FineTuneFields: checkpointing, dtype and LoRA checks, then DPOConfig
