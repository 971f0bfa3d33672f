"""EarthDial's prompts: task templates with their tags, the phi3-chat template and image-token expansion.

The task shapes are the ones EarthDial was trained and evaluated with (docs/model.md); each task also
carries its greedy `max_new_tokens` from EarthDial's evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import EarthDialError, ErrorCode
from .tokens import IMG_CONTEXT, IMG_END, IMG_START

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
    num_beams: int = 5  # beams upstream's evaluation script for this kind of task defaults to


# Options and classes in the order and wording of upstream's xBD evaluation prompts.
DISASTER_TYPES = "volcano, fire, earthquake, flood, tsunami, wind."
DAMAGE_CLASSES = "no-damage, destroyed, minor-damage, major-damage"
# Upstream's evaluation prompt files hold a literal backslash-n (two characters) where the training
# records hold a newline; the refer and grounding scripts turn it back into a newline. The model learnt
# from the training records, so every template here has a real newline.

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # Free chat has no upstream evaluation; upstream's demo worker chats with one beam.
        Task("chat", "Free question about the image", "{sensor} {images}\n {prompt}", 300, num_beams=1),
        Task("caption", "Caption the image",
             "[caption] {sensor} {images}\n Could you please provide the caption for the input image?", 100,
             needs_prompt=False),
        Task("vqa", "Short answer to a question",
             "{sensor} {images}\n {prompt} Answer the question using a single word.", 10),
        Task("classify", "Scene class from a list (prompt: comma-separated classes)",
             "{sensor} {images}\n Classify the given image in one of the following classes. Classes: {prompt} \n"
             "Answer in one word or a short phrase.", 10),
        Task("grounding", "Describe the image with object boxes",
             "[grounding] {sensor} {images}\n Describe the image in detail. Detect objects location. "
             "Describe objects size. Where objects are located?. Describe relation between objects.", 300,
             needs_prompt=False, grounded=True, num_beams=2),
        Task("refer", "Find objects (prompt: what to find, e.g. 'ships')",
             "[refer] {sensor} {images}\n Give me the location of <ref>{prompt}</ref>", 100, grounded=True,
             num_beams=2),
        Task("identify", "What is at a box (prompt: [[x1, y1, x2, y2, angle]] on 0-100)",
             "[identify] {sensor} {images}\n what object is in this location <box>{prompt}</box>", 30,
             num_beams=2),
        # No <image> in upstream's TreeSatAI question, so `<image>\n` goes first (render_chat).
        Task("tree_species", "Tree species from a list (RGB + NIR; prompt: comma-separated species)",
             "{sensor} [treeclassify] Classify the botanical tree species present inside the image in one of the "
             "following species. Species: {prompt} \nAnswer in one word or a short phrase.", 10,
             sensor="[hr_rgbi_0.5]"),
        Task("methane", "Is there a methane plume? (RGB + methane band; Methane_UHI checkpoint)",
             "{sensor} {images}\n Does this image has a methane plume ? \nAnswer in one word or a short phrase.",
             10, needs_prompt=False, sensor="[hyper_rgb_3]"),
        Task("uhi", "Urban heat island question (8-band Landsat; Methane_UHI checkpoint)",
             "[uhi] {sensor} {images}\n {prompt}", 50, sensor="[l8_ms_30]",
             default_prompt="What factors are responsible for the temperature?"),
        Task("change", "Is there a semantic change between two images?",
             "[changedet] {sensor} {images}\n are there any semantic change detected in the provided images?", 100,
             needs_prompt=False, images=2, sensor="[hr_rgb_temp_0.5]"),
        Task("disaster", "Type of disaster between two images (prompt: options)",
             "[changedet] {sensor} {images}\n Analyze the images to identify the type of disaster that occurred. "
             "Options: {prompt}", 10, images=2, sensor="[hr_rgb_temp_0.5]", default_prompt=DISASTER_TYPES),
        Task("damage", "Damage level of the building at a box (prompt: [[x1, y1, x2, y2, angle]])",
             "[identify] {sensor} {images}\n Compare the building at <box>{prompt}</box> between the pre-disaster "
             "and post-disaster images. In the post-disaster image, classify the level of damage. "
             f"Classes: {DAMAGE_CLASSES}.", 10, images=2, sensor="[hr_rgb_temp_0.5]"),
        Task("post_disaster_refer", "Find objects in the later image of a pair (prompt: e.g. 'buildings')",
             "[refer] {sensor} {images}\n Locate all large <ref>{prompt}</ref> in the post-disaster image.", 100,
             images=2, grounded=True, sensor="[hr_rgb_temp_0.5]"),
    )
}  # fmt: skip

DECODINGS = ("upstream", "greedy")

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


def decoding_for(name: str, mode: str) -> tuple[int, int]:
    """(num_beams, min_new_tokens) for a task: "upstream" is what upstream's evaluation scripts run
    (their --num-beams default for the task's kind, min_new_tokens 1; one beam and no minimum where
    upstream chats), "greedy" is one beam and no minimum."""
    if mode not in DECODINGS:
        raise EarthDialError(
            ErrorCode.BAD_REQUEST, f"unknown decoding {mode!r}; known: {', '.join(DECODINGS)}"
        )
    beams = task(name).num_beams
    if mode == "greedy" or beams <= 1:
        return 1, 0
    return beams, 1


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
