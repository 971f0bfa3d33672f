"""EarthDial's prompts: task templates with their tags, the phi3-chat template and image-token expansion.

The task shapes are the ones EarthDial was trained and evaluated with (docs/model.md); each task also
carries its `max_new_tokens` from EarthDial's evaluation, and the decodings (`decoding_for`) say how
answers are decoded: greedily as EarthDial's evaluation did, with its scripts' beams, or sampled as its
demo chats.
"""

from __future__ import annotations

from dataclasses import dataclass

from earthdial.contract.wire import EarthDialError, ErrorCode
from earthdial.model.tokens import IMG_CONTEXT, IMG_END, IMG_START

IMAGE = "<image>"


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    template: str  # {sensor}, {images} and {prompt} are filled in; "<image>" marks where a picture goes
    max_new_tokens: int
    needs_prompt: bool = True
    grounded: bool = False  # answers carry boxes
    images: int = 1  # how many images (layers) the task takes; 2 = a before/after pair
    sensor: str = "[hr_rgb_0.5]"  # default sensor tag
    default_prompt: str = ""
    num_beams: int = 5  # the `--num-beams` default of upstream's evaluation script for this kind of task


# Options and classes in the order and wording of upstream's xBD evaluation prompts.
DISASTER_TYPES = "volcano, fire, earthquake, flood, tsunami, wind."
DAMAGE_CLASSES = "no-damage, destroyed, minor-damage, major-damage"
# Upstream's evaluation prompt files hold a literal backslash-n (two characters) where the training
# records hold a newline; the refer and grounding scripts turn it back into a newline. The model learnt
# from the training records, so every template here has a real newline. The refer and grounding
# scripts write `<image> \n Give ...` (a space before the newline): those two keep it.

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # Free chat has no upstream evaluation (one beam in every decoding; upstream's demo samples it).
        Task("chat", "Free question about the image", "{sensor} {images}\n {prompt}", 300, num_beams=1),
        Task(
            "caption",
            "Caption the image",
            "[caption] {sensor} {images}\n Could you please provide the caption for the input image?",
            100,
            needs_prompt=False,
        ),
        Task(
            "vqa",
            "Short answer to a question",
            "{sensor} {images}\n {prompt} Answer the question using a single word.",
            10,
        ),
        Task(
            "classify",
            "Scene class from a list (prompt: comma-separated classes)",
            "{sensor} {images}\n Classify the given image in one of the following classes. Classes: {prompt} \n"
            "Answer in one word or a short phrase.",
            10,
        ),
        Task(
            "grounding",
            "Describe the image with object boxes",
            "[grounding] {sensor} {images} \n Describe the image in detail. Detect objects location. "
            "Describe objects size. Where objects are located?. Describe relation between objects.",
            300,
            needs_prompt=False,
            grounded=True,
            num_beams=2,
        ),
        Task(
            "refer",
            "Find objects (prompt: what to find, e.g. 'ships')",
            "[refer] {sensor} {images} \n Give me the location of <ref>{prompt}</ref>",
            100,
            grounded=True,
            num_beams=2,
        ),
        Task(
            "identify",
            "What is at a box (prompt: [[x1, y1, x2, y2, angle]] on 0-100)",
            "[identify] {sensor} {images}\n what object is in this location <box>{prompt}</box>",
            30,
            num_beams=2,
        ),
        # No <image> in upstream's TreeSatAI question, so `<image>\n` goes first (render_chat).
        Task(
            "tree_species",
            "Tree species from a list (RGB + NIR; prompt: comma-separated species)",
            "{sensor} [treeclassify] Classify the botanical tree species present inside the image in one of the "
            "following species. Species: {prompt} \nAnswer in one word or a short phrase.",
            10,
            sensor="[hr_rgbi_0.5]",
        ),
        Task(
            "methane",
            "Is there a methane plume? (RGB + methane band; Methane_UHI checkpoint)",
            "{sensor} {images}\n Does this image has a methane plume ? \nAnswer in one word or a short phrase.",
            10,
            needs_prompt=False,
            sensor="[hyper_rgb_3]",
        ),
        Task(
            "uhi",
            "Urban heat island question (8-band Landsat; Methane_UHI checkpoint)",
            "[uhi] {sensor} {images}\n {prompt}",
            50,
            sensor="[l8_ms_30]",
            default_prompt="What factors are responsible for the temperature?",
        ),
        Task(
            "change",
            "Is there a semantic change between two images?",
            "[changedet] {sensor} {images}\n are there any semantic change detected in the provided images?",
            100,
            needs_prompt=False,
            images=2,
            sensor="[hr_rgb_temp_0.5]",
        ),
        Task(
            "disaster",
            "Type of disaster between two images (prompt: options)",
            "[changedet] {sensor} {images}\n Analyze the images to identify the type of disaster that occurred. "
            "Options: {prompt}",
            10,
            images=2,
            sensor="[hr_rgb_temp_0.5]",
            default_prompt=DISASTER_TYPES,
        ),
        Task(
            "damage",
            "Damage level of the building at a box (prompt: [[x1, y1, x2, y2, angle]])",
            "[identify] {sensor} {images}\n Compare the building at <box>{prompt}</box> between the pre-disaster "
            "and post-disaster images. In the post-disaster image, classify the level of damage. "
            f"Classes: {DAMAGE_CLASSES}.",
            10,
            images=2,
            sensor="[hr_rgb_temp_0.5]",
        ),
        Task(
            "post_disaster_refer",
            "Find objects in the later image of a pair (prompt: e.g. 'buildings')",
            "[refer] {sensor} {images}\n Locate all large <ref>{prompt}</ref> in the post-disaster image.",
            100,
            images=2,
            grounded=True,
            sensor="[hr_rgb_temp_0.5]",
        ),
    )
}


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    repetition_penalty: float


@dataclass(frozen=True)
class Decoding:
    """How a query is decoded (`decoding_for`). `system_message` replaces the checkpoint's when set."""

    num_beams: int = 1
    min_new_tokens: int = 1
    sampling: Sampling | None = None
    system_message: str | None = None


# Upstream's demo (demo/app.py's slider defaults, sent to demo/model_worker.py, which sets the model's
# system message to what the app sends: its default text, a blank line and the editable persona, whose
# default is the same text).
DEMO_SAMPLING = Sampling(temperature=0.7, top_p=0.95, repetition_penalty=1.1)
DEMO_SYSTEM_MESSAGE = (
    "Please describe this image in the details!\n\nPlease describe this image in the details!"
)
DECODINGS = ("greedy", "beams", "upstream_demo")
DEFAULT_DECODING = "greedy"  # what EarthDial's published evaluation ran

DEFAULT_SENSOR = "[hr_rgb_0.5]"


def task(name: str) -> Task:
    if name not in TASKS:
        raise EarthDialError(
            ErrorCode.UNKNOWN_TASK, f"unknown task {name!r}; known tasks: {', '.join(TASKS)}"
        )
    return TASKS[name]


# First words of a question or an instruction: a prompt starting so is asked as chat, not looked for.
QUESTION_WORDS = frozenset(
    "what where which who whom whose why when how is are was were do does did can could will would should "
    "has have had describe count list tell give explain find show locate detect identify classify".split()
)
MAX_OBJECT_WORDS = 4  # "ships", "small boats", "oil storage tanks": the refer prompts EarthDial learnt


def default_task(prompt: str) -> str:
    """The task for a prompt given without one: `refer` when it names objects (a short noun phrase such
    as "ships"), so that the answer has boxes; `chat` for a question, an instruction or no prompt."""
    words = prompt.strip().rstrip(".").split()
    if not words or "?" in prompt or len(words) > MAX_OBJECT_WORDS:
        return "chat"
    return "chat" if words[0].lower() in QUESTION_WORDS else "refer"


def decoding_for(name: str, mode: str) -> Decoding:
    """How task `name` is decoded in `mode`:
    - "greedy": one beam, `min_new_tokens` 1 - what EarthDial's evaluation ran (each script sets
      num_beams 1 under `--dynamic`, which every published evaluation command passes);
    - "beams": the scripts' `--num-beams` default for the task's kind (5 or 2; what they run without
      `--dynamic`), `min_new_tokens` 1; free chat keeps one beam;
    - "upstream_demo": sampled as upstream's demo chats (temperature 0.7, top_p 0.95, repetition
      penalty 1.1, one beam) under the demo's system message."""
    if mode not in DECODINGS:
        hint = " ('upstream' was renamed 'beams'; EarthDial's evaluation itself decodes greedily)"
        raise EarthDialError(
            ErrorCode.BAD_REQUEST,
            f"unknown decoding {mode!r:.40}; known: {', '.join(DECODINGS)}"
            + (hint if mode == "upstream" else ""),
        )
    spec = task(name)
    if mode == "beams":
        return Decoding(num_beams=spec.num_beams)
    if mode == "upstream_demo":
        return Decoding(min_new_tokens=0, sampling=DEMO_SAMPLING, system_message=DEMO_SYSTEM_MESSAGE)
    return Decoding()


def build_question(name: str, prompt: str, sensor: str | None = None, images: int | None = None) -> str:
    """The user turn for a task, with its task and sensor tags and one <image> marker per image
    (`<image> <image>` for pairs, as in EarthDial's temporal prompts)."""
    spec = task(name)
    prompt = (prompt or "").strip() or spec.default_prompt
    if spec.needs_prompt and not prompt:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"task {name!r} needs a prompt ({spec.description})")
    n = spec.images if images is None else images
    if 0 < n < spec.images:  # 0: a follow-up turn, whose images are in the history's first question
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"task {name!r} takes {spec.images} images, got {n}")
    markers = " ".join([IMAGE] * n)
    text = spec.template.format(sensor=sensor or spec.sensor, images=markers, prompt=prompt).strip()
    return text.replace("  ", " ").replace(" \n ", " ") if n == 0 else text


def render_chat(question: str, system: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    """phi3-chat: `<|system|>\\n{system}<|end|><|user|>\\n{q}<|end|><|assistant|>\\n{a}<|end|>...`, ending
    with an open assistant turn. A question without <image> gets `<image>\\n` put first."""
    if IMAGE not in question and not any(IMAGE in q for q, _ in history):
        question = f"{IMAGE}\n{question}"
    text = f"<|system|>\n{system}<|end|>"
    for q, a in history:
        text += f"<|user|>\n{q}<|end|><|assistant|>\n{a}<|end|>"
    return text + f"<|user|>\n{question}<|end|><|assistant|>\n"


def expand_images(text: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Replace each <image> in order by <img> + <IMG_CONTEXT> x (tiles x tokens per tile) + </img>."""
    count = text.count(IMAGE)
    if count != len(tiles_per_image):
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"prompt has {count} <image> markers for {len(tiles_per_image)} images"
        )
    for tiles in tiles_per_image:
        text = text.replace(IMAGE, IMG_START + IMG_CONTEXT * (tiles * tokens_per_tile) + IMG_END, 1)
    return text
