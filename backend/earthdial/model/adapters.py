"""LoRA adapters (peft) on the native InternVL model: which modules they adapt, how one is saved with what
it was trained on, and how `serve --adapter` loads one (merged into the weights, so inference runs at the
base model's speed and through the same code).

An adapter folder is peft's own (``adapter_config.json``, ``adapter_model.safetensors``) plus
``earthdial_adapter.json``: the base checkpoint it was trained on (its name, variant, parameter count and
vocabulary size, checked on loading), the records and the training run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from earthdial.model.checkpoint import CheckpointError

META_FILE = "earthdial_adapter.json"
# Phi-3's projections (attention qkv and output, the fused gate/up and the down projection) inside the
# language model only: the vision tower's own q/k/v and fc layers are left as they are.
LLM_TARGETS = r".*language_model.*\.(qkv_proj|o_proj|gate_up_proj|down_proj)$"
PROJECTOR = "multi_modal_projector"
# optionally the vision tower's attention and MLP too (InternViT in transformers' naming): for objects the
# tower has never learned to tell apart, whose boxes the frozen image tokens do not carry
VISION_TARGETS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|projection_layer|fc1|fc2)$"


def base_identity(model: Any, info: Any) -> dict[str, Any]:
    """What an adapter must match: the checkpoint's folder name, variant, parameters and vocabulary."""
    return {
        "name": Path(str(info.path).rstrip("/")).name,
        "variant": info.variant,
        "parameters": int(info.num_parameters),
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
    }


def lora_config(
    rank: int = 16, alpha: float = 32.0, dropout: float = 0.05, projector: bool = False, vision: bool = False
) -> Any:
    from peft import LoraConfig

    targets = f"({LLM_TARGETS})|({VISION_TARGETS})" if vision else LLM_TARGETS
    scale: Any = alpha  # peft annotates an int but scales by alpha / r: a float is fine
    return LoraConfig(
        r=rank,
        lora_alpha=scale,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=[PROJECTOR] if projector else None,
        bias="none",
    )


def wrap(model: Any, config: Any) -> Any:
    """The peft model around ``model`` (its modules are adapted in place: ``model`` itself now runs with
    the adapter, which is what the engine and the training step use)."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def save(peft_model: Any, directory: str | Path, meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(directory))
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} is not a LoRA adapter folder (no adapter_config.json)")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not JSON: {exc}") from None


def apply(model: Any, info: Any, directory: str | Path, merge: bool = True) -> tuple[Any, dict[str, Any]]:
    """Load the adapter in ``directory`` onto ``model`` (checked against the base it was trained on);
    merged into the weights unless ``merge`` is False. Returns the model and a description for status."""
    try:
        from peft import PeftModel
    except ImportError:
        raise CheckpointError(
            "loading an adapter needs peft: pip install 'earthdial-qgis[finetune]'"
        ) from None
    meta = read_meta(directory)
    want, have = meta.get("base") or {}, base_identity(model, info)
    wrong = [k for k in ("variant", "parameters", "vocab_size") if k in want and want[k] != have[k]]
    if wrong:
        raise CheckpointError(
            f"adapter {directory} was trained on {want.get('name')} ({', '.join(f'{k} {want[k]}' for k in wrong)}),"
            f" not on the loaded {have['name']} ({', '.join(f'{k} {have[k]}' for k in wrong)})"
        )
    try:
        peft_model = PeftModel.from_pretrained(model, str(directory))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot load adapter {directory}: {exc}") from None
    model = peft_model.merge_and_unload() if merge else peft_model
    model.eval()
    description = {
        "path": str(Path(directory).resolve()),
        "name": Path(str(directory).rstrip("/")).name,
        "base": want.get("name"),
        "records": meta.get("records"),
        "steps": (meta.get("training") or {}).get("steps"),
        "merged": merge,
    }
    return model, description


__all__ = ["LLM_TARGETS", "apply", "base_identity", "lora_config", "read_meta", "save", "wrap"]
