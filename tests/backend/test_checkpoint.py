"""The published layout -> native InternVL conversion, held to expectations written from EarthDial's layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import run_earthdial
from earthdial.model import checkpoint
from earthdial.model.checkpoint import CheckpointError


def published_keys(vision_layers: int, llm_layers: int) -> set[str]:
    """Every key an InternVL2-4B-layout checkpoint holds, written out from the published layout."""
    keys = {
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.position_embedding",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.patch_embedding.bias",
        "mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight", "mlp1.1.bias", "mlp1.3.weight", "mlp1.3.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    }  # fmt: skip
    for i in range(vision_layers):
        p = f"vision_model.encoder.layers.{i}."
        keys |= {
            p + s
            for s in (
                "attn.qkv.weight",
                "attn.qkv.bias",
                "attn.proj.weight",
                "attn.proj.bias",
                "ls1",
                "ls2",
                "norm1.weight",
                "norm1.bias",
                "norm2.weight",
                "norm2.bias",
                "mlp.fc1.weight",
                "mlp.fc1.bias",
                "mlp.fc2.weight",
                "mlp.fc2.bias",
            )
        }
    for i in range(llm_layers):
        p = f"language_model.model.layers.{i}."
        keys |= {
            p + s
            for s in (
                "self_attn.qkv_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight",
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
            )
        }
    return keys


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path):
    return checkpoint.load(tiny_checkpoint)


def test_tiny_checkpoint_is_in_the_published_layout(tiny_checkpoint: Path) -> None:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat"
    assert cfg["template"] == "phi3-chat" and cfg["ps_version"] == "v2"
    assert cfg["llm_config"]["architectures"] == ["Phi3ForCausalLM"]
    assert cfg["llm_config"]["rope_scaling"]["type"] == "su"
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    vl, ll = cfg["vision_config"]["num_hidden_layers"], cfg["llm_config"]["num_hidden_layers"]
    assert set(weights) == published_keys(vl, ll)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_checkpoint / name).exists()


def test_every_published_weight_lands_on_the_native_model(tiny_checkpoint: Path, loaded) -> None:
    model, _, _ = loaded
    published = load_file(str(tiny_checkpoint / "model.safetensors"))
    native = model.state_dict()
    d = json.loads((tiny_checkpoint / "config.json").read_text())["vision_config"]["hidden_size"]
    layer0 = "model.vision_tower.encoder.layer.0.attention."
    qkv = published["vision_model.encoder.layers.0.attn.qkv.weight"]
    torch.testing.assert_close(native[layer0 + "q_proj.weight"], qkv[:d])
    torch.testing.assert_close(native[layer0 + "k_proj.weight"], qkv[d : 2 * d])
    torch.testing.assert_close(native[layer0 + "v_proj.weight"], qkv[2 * d :])
    torch.testing.assert_close(
        native["model.vision_tower.encoder.layer.1.lambda_2"], published["vision_model.encoder.layers.1.ls2"]
    )
    torch.testing.assert_close(
        native["model.multi_modal_projector.linear_2.weight"], published["mlp1.3.weight"]
    )
    torch.testing.assert_close(native["lm_head.weight"], published["language_model.lm_head.weight"])
    # Phi-3's lm_head is untied: the loaded head must not be the embedding matrix
    assert not torch.equal(native["lm_head.weight"], native["model.language_model.embed_tokens.weight"])
    total_published = sum(t.numel() for t in published.values())
    assert sum(p.numel() for p in model.parameters()) == total_published


def test_round_trip_of_names_is_exact(tiny_checkpoint: Path) -> None:
    published = load_file(str(tiny_checkpoint / "model.safetensors"))
    native, unknown = checkpoint.published_to_native(published)
    assert unknown == []
    back = checkpoint.native_to_published(native)
    assert set(back) == set(published)
    for k in published:
        assert torch.equal(back[k], published[k]), k


@pytest.mark.parametrize("key", ["lm_head.bias", "model.multi_modal_projector.layer_norm.running_mean"])
def test_a_native_key_the_loader_would_not_understand_gets_no_published_name(key: str) -> None:
    """Writing goes through the same table as reading: a native key whose published name the loader would
    list as unknown (Phi-3's head has no bias; the projector holds weights and biases only) is refused."""
    with pytest.raises(CheckpointError, match="no published name"):
        checkpoint.native_to_published({key: torch.zeros(2)})


def test_config_conversion_handles_phi3_traps(loaded) -> None:
    model, _, info = loaded
    assert model.config.tie_word_embeddings is False
    assert model.config.text_config.rope_parameters["rope_type"] == "longrope"
    assert info.image_size == 224
    assert info.tokens_per_tile == (224 // 14) ** 2 // 4 == 64


def _pixel_shuffle_v2(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's pixel_shuffle with ps_version v2, written out from the published algorithm."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def _reference_image_features(w: dict[str, torch.Tensor], cfg: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternViT + pixel shuffle + mlp1, computed straight from the published weights."""
    vc = cfg["vision_config"]
    d, heads, eps = vc["hidden_size"], vc["num_attention_heads"], vc["layer_norm_eps"]
    x = F.conv2d(
        pixels,
        w["vision_model.embeddings.patch_embedding.weight"],
        w["vision_model.embeddings.patch_embedding.bias"],
        stride=vc["patch_size"],
    )
    x = x.flatten(2).transpose(1, 2)
    cls = w["vision_model.embeddings.class_embedding"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + w["vision_model.embeddings.position_embedding"]
    for i in range(vc["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        h = F.layer_norm(x, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        qkv = F.linear(h, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ v
        att = att.transpose(1, 2).reshape(x.shape)
        x = x + w[p + "ls1"] * F.linear(att, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
        h = F.linear(
            F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
            w[p + "mlp.fc2.weight"],
            w[p + "mlp.fc2.bias"],
        )
        x = x + w[p + "ls2"] * h
    x = x[:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = _pixel_shuffle_v2(x.reshape(x.shape[0], side, side, -1), cfg["downsample_ratio"])
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    return F.linear(
        F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"], w["mlp1.3.bias"]
    )


def test_image_features_match_a_reference_computed_from_published_weights(
    tiny_checkpoint: Path, loaded
) -> None:
    model, _, _ = loaded
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = _reference_image_features(weights, cfg, pixels)
    with torch.no_grad():
        got = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert got.shape == (2, 64, cfg["llm_config"]["hidden_size"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_pixel_shuffle_matches_reference(loaded) -> None:
    model, _, _ = loaded
    x = torch.arange(2 * 4 * 4 * 8, dtype=torch.float32).reshape(2, 4, 4, 8)
    torch.testing.assert_close(model.model.pixel_shuffle(x, 0.5), _pixel_shuffle_v2(x))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_misshapen_weights_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    w = load_file(str(bad / "model.safetensors"))
    del w["mlp1.1.bias"]
    w["language_model.model.norm.weight"] = torch.zeros(3)
    w["vision_model.extra.weight"] = torch.zeros(1)
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(bad)
    text = str(err.value)
    assert "missing weights: mlp1.1.bias" in text
    assert "model.language_model.norm.weight" in text and "wrong shapes" in text
    assert "vision_model.extra.weight" in text


def test_serve_refuses_a_broken_checkpoint_and_names_the_keys(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    w = load_file(str(bad / "model.safetensors"))
    del w["language_model.lm_head.weight"]
    save_file(w, str(bad / "model.safetensors"))
    proc = run_earthdial(
        "serve",
        "--model",
        str(bad),
        "--endpoint",
        "tcp://127.0.0.1:0",
        timeout=120,
    )
    assert proc.returncode != 0
    assert "language_model.lm_head.weight" in proc.stderr


def test_missing_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_device_load_equals_the_copying_load(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    """The default (meta device, tensor by tensor, assign) gives the former path's weights, buffers and
    logits exactly, with nothing left on the meta device."""
    old, _, _ = checkpoint.load(tiny_checkpoint, dtype=dtype, weights="copy")
    new, _, _ = checkpoint.load(tiny_checkpoint, dtype=dtype)
    for a, b in (
        (old.state_dict(), new.state_dict()),
        (dict(old.named_buffers()), dict(new.named_buffers())),
    ):
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not any(t.is_meta for t in (*new.parameters(), *new.buffers()))
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.equal(old(input_ids=ids).logits, new(input_ids=ids).logits)


def test_streamed_safetensors_read_and_write_match_the_library(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2, 2),
    }
    path = tmp_path / "w.safetensors"
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    checkpoint.write_safetensors(path, specs, lambda name: tensors[name], metadata={"format": "pt"})
    for name, t in load_file(str(path)).items():  # the library reads what we wrote
        assert torch.equal(t, tensors[name])
    save_file(tensors, str(tmp_path / "lib.safetensors"))
    read = dict(checkpoint.iter_safetensors(tmp_path / "lib.safetensors"))  # we read what it wrote
    assert set(read) == set(tensors) and all(torch.equal(read[k], tensors[k]) for k in tensors)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "lib.safetensors").read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="cut short"):
        list(checkpoint.iter_safetensors(tmp_path / "cut.safetensors"))
