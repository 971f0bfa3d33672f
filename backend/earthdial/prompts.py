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
    template: str  # {sensor} and {prompt} are filled in; "<image>" marks where the picture goes
    max_new_tokens: int
    needs_prompt: bool = True
    grounded: bool = False  # answers carry boxes


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("chat", "Free question about the image", "{sensor} <image>\n {prompt}", 300),
        Task(
            "caption",
            "Caption the image",
            "[caption] {sensor} <image>\n Could you please provide the caption for the input image?",
            100,
            needs_prompt=False,
        ),
        Task(
            "vqa",
            "Short answer to a question",
            "{sensor} <image>\n {prompt} Answer the question using a single word.",
            10,
        ),
        Task(
            "classify",
            "Scene class from a list (prompt: comma-separated classes)",
            "{sensor} <image>\n Classify the given image in one of the following classes. Classes: {prompt} \n"
            "Answer in one word or a short phrase.",
            10,
        ),
        Task(
            "grounding",
            "Describe the image with object boxes",
            "[grounding] {sensor} <image>\n Describe the image in detail. Detect objects location. Describe objects size."
            " Where objects are located?. Describe relation between objects.",
            300,
            needs_prompt=False,
            grounded=True,
        ),
        Task(
            "refer",
            "Find objects (prompt: what to find, e.g. 'ships')",
            "[refer] {sensor} <image>\n Give me the location of <ref>{prompt}</ref>",
            100,
            grounded=True,
        ),
        Task(
            "identify",
            "What is at a box (prompt: [[x1, y1, x2, y2, angle]] on 0-100)",
            "[identify] {sensor} <image>\n what object is in this location <box>{prompt}</box>",
            30,
        ),
    )
}

DEFAULT_SENSOR = "[hr_rgb_0.5]"


def build_question(task: str, prompt: str, sensor: str = DEFAULT_SENSOR) -> str:
    """The user turn for a task, with its task and sensor tags and an <image> marker."""
    if task not in TASKS:
        raise EarthDialError(
            ErrorCode.UNKNOWN_TASK, f"unknown task {task!r}; known tasks: {', '.join(TASKS)}"
        )
    spec = TASKS[task]
    prompt = (prompt or "").strip()
    if spec.needs_prompt and not prompt:
        raise EarthDialError(ErrorCode.BAD_REQUEST, f"task {task!r} needs a prompt ({spec.description})")
    return spec.template.format(sensor=sensor, prompt=prompt).strip()


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
