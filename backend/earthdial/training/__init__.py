"""Training the demo model and making test checkpoints: not part of the runtime (server, engine, the CLI's
queries), which imports nothing from here (tests/backend/test_contract.py walks its imports). Modules:
`model` (vocabulary, configuration, initialisation), `data` (conversations, augmentation, batches), `loop`
(the two stages and their aids), `evaluate` (held-out scoring), `tiny` (random test checkpoints).

Train the built-in demo model: a micro EarthDial (InternVL layout, phi3 text model, 3 M parameters) on
synthetic scenes (`earthdial.demo.synthetic`), saved in EarthDial's published layout.

The recipe is EarthDial's in miniature, a vision stage then instruction tuning on conversations:

* records are conversations in EarthDial's format (`[{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]`) built with the same task prompts the server sends
  (`prompts.build_question`), rendered with the phi3-chat template (`prompts.render_chat` /
  `expand_images`, through `Engine.prompt_text`) and with pixels prepared by `Engine.image`, so
  training and inference see identical inputs;
* the loss is on the assistant tokens only; number tokens (every integer 0-100 is one token) get soft
  targets, a Gaussian over neighbouring values (sigma 1.5), since a box off by one is nearly right;
* stage 1 trains the vision tower and projector alone through training-only dense heads (per patch the
  share of each class, per image token the class and box of the object covering it): cheap, and where
  localisation is learned. Stage 2 freezes the tower (unless `freeze_vision` is off) and trains the
  projector and language model on the conversations, with two training-only attention targets (the "look"
  aids): one head of layers 2-3 attends to the object whose box is being written, one head of layer 1
  matches each token of a pair's later image with the same cell of the earlier one;
* initialisation: 2-D sin-cos ViT position embeddings, smooth sin-cos number-token vectors, and a quadratic
  code in two dimensions of the numbers' output rows (see `build_model`);
* AdamW (0.9, 0.98), weight decay 0.05, warm-up then cosine in each stage, clip 1.0; bf16 autocast only
  where the CPU computes bf16 natively (on AVX2-only CPUs it is ~20x slower than fp32).

Tasks: referring (`[refer]`, with follow-up turns for the scene's other objects), grounded description
(`[grounding]`), caption (`[caption]`), classification of the main object, region identification
(`[identify]`) and change between two images (`[changedet]`: Yes/No plus the boxes of what appeared or
disappeared). `evaluate` scores a checkpoint on held-out scenes through the server's own request path.
"""

from __future__ import annotations

from earthdial.training.data import (
    ABSENT_MIX,
    Batch,
    Example,
    SoftNumberLoss,
    _cells_of,
    _render_size,
    _turn_array,
    absent_answer,
    collate,
    dense_targets,
    make_examples,
    turn_scene,
)
from earthdial.training.evaluate import EvalResult, box_iou, evaluate, truth_box
from earthdial.training.loop import (
    DenseAid,
    ThreadTuner,
    TrainConfig,
    attend_eagerly,
    continuation,
    optimiser,
    train,
    train_step,
)
from earthdial.training.model import (
    DEMO_DIR,
    EVAL_SEED,
    NUMBERS,
    SYNONYMS,
    build_model,
    build_tokenizer,
    demo_published_config,
    make_engine,
    save_checkpoint,
)

__all__ = [
    "Batch",
    "Example",
    "ThreadTuner",
    "_render_size",
    "ABSENT_MIX",
    "DEMO_DIR",
    "DenseAid",
    "EVAL_SEED",
    "EvalResult",
    "NUMBERS",
    "SYNONYMS",
    "SoftNumberLoss",
    "TrainConfig",
    "_cells_of",
    "_turn_array",
    "absent_answer",
    "attend_eagerly",
    "box_iou",
    "build_model",
    "build_tokenizer",
    "collate",
    "continuation",
    "demo_published_config",
    "dense_targets",
    "evaluate",
    "make_engine",
    "make_examples",
    "optimiser",
    "save_checkpoint",
    "train",
    "train_step",
    "truth_box",
    "turn_scene",
]
