"""Special tokens of the EarthDial checkpoints and what their presence says about the variant.

The lists are the published vocabulary additions (see docs/model.md); the ids always come from the
checkpoint's tokenizer, never from here.
"""

from __future__ import annotations

# Phi-3's chat tokens, in their published order (ids 32000..32010 in Phi-3-mini).
PHI3_TOKENS = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)  # fmt: skip
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
# Added by InternVL2 (ids 32011.. in InternVL2-4B).
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

SENSOR_TAGS = (
    "[s2_rgb_10]", "[l8_rgb_30]", "[s2_ms_10]", "[hr_rgb_0.5]", "[hr_rgb_temp_0.5]", "[hr_rgbi_0.5]",
    "[s1_vh_10]", "[s1_vh_1]", "[l8_ms_30]", "[hyper_rgb_3]", "[s1_vh_temp_10]",
)  # fmt: skip
TASK_TAGS = (
    "[treeclassify]",
    "[grounding]",
    "[refer]",
    "[classify]",
    "[identify]",
    "[caption]",
    "[changedet]",
    "[uhi]",
)
EARTHDIAL_OTHER = ("<mb>", "</mb>")
# Present only in the Methane_UHI checkpoint's vocabulary.
METHANE_UHI_ONLY = ("[uhi]", "[l8_ms_30]", "[hyper_rgb_3]")

VARIANTS = ("EarthDial_4B_RGB", "EarthDial_4B_MS", "EarthDial_4B_Methane_UHI")

# Generation stops on these: the phi3-chat separator only, as upstream's chat() (Phi-3's generation
# config also lists </s> and <|endoftext|>; upstream passes eos_token_id=<|end|> alone).
STOP_TOKENS = ("<|end|>",)
# Removed from decoded answers; the grounding markup (<ref>, <box>, ...) is kept for the parser.
CHAT_TOKENS = ("<s>", "</s>", "<unk>", *PHI3_TOKENS)


def earthdial_tokens(variant: str) -> tuple[str, ...]:
    """EarthDial's added tokens in the order they were added, for one published variant."""
    tokens = (*SENSOR_TAGS, *TASK_TAGS, *EARTHDIAL_OTHER)
    if variant == "EarthDial_4B_Methane_UHI":
        return tokens
    return tuple(t for t in tokens if t not in METHANE_UHI_ONLY)


def detect_variant(vocab: set[str], declared: str | None = None) -> str:
    """The variant a checkpoint is, from its vocabulary (a declared name in config.json wins when
    consistent). RGB and MS share a vocabulary, so without a declaration they read as RGB."""
    if all(t in vocab for t in METHANE_UHI_ONLY):
        return "EarthDial_4B_Methane_UHI"
    if declared in VARIANTS and declared != "EarthDial_4B_Methane_UHI":
        return declared
    return "EarthDial_4B_RGB"
