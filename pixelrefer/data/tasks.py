"""ShapesWorld questions and answers: one `TaskRecord` per task type the paper trains on.

Notable:
- Image tasks: category recognition (multi-turn, LVIS prompt), short caption
  (VG prompt), detailed caption (colour, size, shape, position, parts,
  occluder, nearest neighbour), and multi-object region QA: relations,
  comparisons (size, colour), counting and parts; and lettered-option
  questions on images (colour or shape, VideoRefer-Bench-Q's layout; opt-in),
  so a model meets the option-letter form on images, not only on videos.
- Video tasks: object motion captions (one turn per object) and
  VideoRefer-Bench-Q-style multiple choice of the five types (Basic,
  Sequential, Relationship, Reasoning, Future) with lettered options.
- Every sentence is built from the templates and word tables in this file and
  in scenes.py, which is what lets `shapesworld_vocabulary()` list every word
  the generator can emit; a test tokenises every generated text to hold it.
- Answers come from the scene's ground truth (visible masks, centroids,
  motion), and a question is only asked when its answer is unambiguous
  (e.g. a relation needs one axis clearly dominant).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np

from pixelrefer.data.formats import bench_q_prompt
from pixelrefer.data.scenes import CATEGORIES, COLOURS, COMPOSITES, MOTIONS, Scene, SceneObject, Track, VideoScene

CATEGORY_Q = "What is the category of <region>? Using only one word or phrase."
SHORT_Q = "Please describe <region> briefly."
DETAILED_Q = "Please describe the <region> in the image in detail."
RELATION_Q = "Where is <object0><region> relative to <object1><region>?"
RELATION_A = "<object0> is {relation} <object1>."
SIZE_Q = "Which is {adjective}, <object0><region> or <object1><region>?"
SIZE_A = "{name} is {adjective}."
SAME_COLOUR_Q = "Do <object0><region> and <object1><region> have the same colour?"
SAME_COLOUR_YES = "Yes, both are {colour}."
SAME_COLOUR_NO = "No, <object0> is {colour0} and <object1> is {colour1}."
COUNT_Q = "How many other shapes have the same {attribute} as <region>?"
PART_NAME_Q = "What part of <object0><region> is <object1><region>? Using only one word or phrase."
PART_COLOUR_Q = "What colour is the {part} of <region>?"
DETAIL_LOOK = "It is {description} {position} of the image."
DETAIL_PARTS = "It has {parts}."
DETAIL_HIDDEN = "It is partly hidden by {description}."
DETAIL_NEAREST = "The nearest shape is {description}, {direction}."
DETAIL_COUNT = "There are {count} other shapes in the image."
VIDEO_CAPTION_Q = "What does <object{k}><region> do?"
VIDEO_CAPTION_A = "the {colour} {category} {phrase}"
BASIC_COLOUR_Q = "What is the colour of <object0><region>?"
BASIC_SHAPE_Q = "What shape is <object0><region>?"
CHOICE_COLOUR_Q = "What is the colour of <object{k}><region>?"
CHOICE_SHAPE_Q = "What shape is <object{k}><region>?"
SEQUENTIAL_Q = "What happens to <object0><region> over time?"
RELATIONSHIP_Q = "Where is <object0><region> relative to <object1><region> when both are first seen?"
REASONING_Q = "Which moves faster, <object0><region> or <object1><region>?"
FUTURE_Q = "If <object0><region> keeps moving the same way, where will it be after the video?"
LOCATION_Q = "Where is <region> in the image?"
VIDEO_LOCATION_Q = "Where is <object{k}><region> when it is first seen?"
VIDEO_LAST_LOCATION_Q = "Where is <object{k}><region> when it is last seen?"
SHORT_ANSWER_SUFFIX = "Using only one word or phrase."

RELATIONS = {"left": "to the left of", "right": "to the right of", "up": "above", "down": "below"}
DIRECTIONS = {"left": "to its left", "right": "to its right", "up": "above it", "down": "below it"}
MOTION_PHRASES = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
                  "still": "stays still"}
EVENT_PHRASES = {None: "{motion}", "appears": "appears and then {motion}", "disappears": "{motion} and then disappears"}
FUTURE_PHRASES = {"left": "further to the left", "right": "further to the right", "up": "higher up",
                  "down": "lower down", "still": "in the same place"}
SEQUENTIAL_OPTION = "it {phrase}"
SIZE_ADJECTIVES = ("bigger", "smaller")
COUNT_ATTRIBUTES = ("colour", "category")
ARTICLES = ("a", "an")
LIST_JOINERS = (",", "and")
SPEED_OPTIONS = ("<object0>", "<object1>", "both move at the same speed", "neither of them moves")
# The one word a short answer gives for each option text of these question types: the word of that option no
# other option has, so a model that answers it has decided which option is right at the answer's first token.
SHORT_ANSWER_WORDS = {
    **{f"{RELATIONS[side]} <object1>": word
       for side, word in (("left", "left"), ("right", "right"), ("up", "above"), ("down", "below"))},
    **{FUTURE_PHRASES[motion]: word
       for motion, word in (("left", "left"), ("right", "right"), ("up", "higher"), ("down", "lower"),
                            ("still", "same"))},
    **dict(zip(SPEED_OPTIONS, ("<object0>", "<object1>", "both", "neither"))),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
POSITIONS = {"corner": "in the {row} {column} corner", "row": "at the {row}", "column": "on the {column}",
             "center": "in the center"}
LETTERS = "ABCDE"
SHAPE_NAMES = (*CATEGORIES, *COMPOSITES)  # what an object's category can be


@dataclass
class TaskRecord:
    """One record before it is written: text, masks in `<region>` order, and what each mask shows.

    `conversation` holds (human|gpt, text) turns; a multiple-choice record has
    `question` (Question, type, options, Answer) instead.
    """

    task: str
    masks: list  # bool (H, W) per object, or {frame: bool (H, W)} per object in a video
    objects: list[dict]
    conversation: list[tuple[str, str]] = field(default_factory=list)
    question: dict | None = None
    name: str | None = None  # the record id's suffix when a video has several records of this task


# ----------------------------------------------------------------------------- words


def article(word: str) -> str:
    return ARTICLES[word[0] in "aeiou"]


def describe(obj: SceneObject) -> str:
    """'a small red circle'."""
    return f"{article(obj.size)} {obj.size} {obj.colour} {obj.category}"


def position_phrase(x: float, y: float, height: int, width: int) -> str:
    """'in the top left corner', 'at the top', 'on the left', 'in the center', from the 3×3 cell of (x, y)."""
    row, column = ROWS[min(2, int(3 * y / height))], COLUMNS[min(2, int(3 * x / width))]
    kind = {(True, True): "center", (True, False): "column", (False, True): "row"}.get(
        (row == "middle", column == "center"), "corner")
    return POSITIONS[kind].format(row=row, column=column)


def direction(a: tuple[float, float], b: tuple[float, float], ratio: float = 1.5, margin: float = 6.0):
    """Where point a lies relative to b ('left', 'right', 'up', 'down'), or None when unclear."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    big, small = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if big < margin or big < ratio * small:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "up" if dy < 0 else "down"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _info(obj: SceneObject) -> dict:
    return {"category": obj.category, "colour": obj.colour, "size": obj.size, "area": obj.area}


# ----------------------------------------------------------------------------- image tasks


def category_task(scene: Scene, rng: np.random.Generator) -> TaskRecord:
    picked = [scene.objects[i] for i in rng.permutation(len(scene.objects))[:3]]
    turns = [turn for obj in picked for turn in (("human", CATEGORY_Q), ("gpt", obj.category))]
    return TaskRecord("category", [o.mask for o in picked], [_info(o) for o in picked], turns)


def short_caption_task(scene: Scene, rng: np.random.Generator) -> TaskRecord:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return TaskRecord("short_caption", [obj.mask], [_info(obj)], [("human", SHORT_Q), ("gpt", describe(obj))])


def detailed_caption(scene: Scene, index: int) -> str:
    obj = scene.objects[index]
    height, width = obj.mask.shape
    sentences = [DETAIL_LOOK.format(description=describe(obj), position=position_phrase(*obj.centroid, height, width))]
    if obj.parts:
        named = [f"{article(obj.part_colours[p])} {obj.part_colours[p]} {p}" for p in sorted(obj.parts)]
        comma, joiner = LIST_JOINERS
        sentences.append(DETAIL_PARTS.format(parts=f"{comma} ".join(named[:-1]) + f" {joiner} " + named[-1]))
    if obj.occluders:
        sentences.append(DETAIL_HIDDEN.format(description=describe(scene.objects[obj.occluders[0]])))
    others = [j for j in range(len(scene.objects)) if j != index]
    if others:
        distance = [np.hypot(*np.subtract(scene.objects[j].centroid, obj.centroid)) for j in others]
        near = scene.objects[others[int(np.argmin(distance))]]
        side = direction(near.centroid, obj.centroid, ratio=1.0, margin=0.0) or "right"
        sentences.append(DETAIL_NEAREST.format(description=describe(near), direction=DIRECTIONS[side]))
    sentences.append(DETAIL_COUNT.format(count=number_word(len(others))))
    return " ".join(sentences)


def detailed_caption_task(scene: Scene, rng: np.random.Generator) -> TaskRecord:
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    turns = [("human", DETAILED_Q), ("gpt", detailed_caption(scene, index))]
    return TaskRecord("detailed_caption", [obj.mask], [_info(obj)], turns)


def _pairs(scene: Scene, rng: np.random.Generator, keep) -> tuple[SceneObject, SceneObject] | None:
    """A random ordered pair of objects for which `keep(a, b)` holds, or None."""
    n = len(scene.objects)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b and keep(scene.objects[a], scene.objects[b])]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    return scene.objects[a], scene.objects[b]


def relation_task(scene: Scene, rng: np.random.Generator) -> TaskRecord | None:
    pair = _pairs(scene, rng, lambda a, b: direction(a.centroid, b.centroid) is not None)
    if pair is None:
        return None
    a, b = pair
    answer = RELATION_A.format(relation=RELATIONS[direction(a.centroid, b.centroid)])
    return TaskRecord("relation", [a.mask, b.mask], [_info(a), _info(b)], [("human", RELATION_Q), ("gpt", answer)])


def comparison_task(scene: Scene, rng: np.random.Generator) -> TaskRecord | None:
    pair = _pairs(scene, rng, lambda a, b: a.area >= 1.5 * b.area) if rng.random() < 0.5 else None
    if pair is not None:
        big, small = pair
        adjective = SIZE_ADJECTIVES[int(rng.integers(2))]
        a, b = (big, small) if rng.random() < 0.5 else (small, big)
        winner = big if adjective == SIZE_ADJECTIVES[0] else small
        question = SIZE_Q.format(adjective=adjective)
        answer = SIZE_A.format(name="<object0>" if winner is a else "<object1>", adjective=adjective)
    else:
        pair = _pairs(scene, rng, lambda a, b: True)
        if pair is None:
            return None
        a, b = pair
        question = SAME_COLOUR_Q
        answer = (SAME_COLOUR_YES.format(colour=a.colour) if a.colour == b.colour
                  else SAME_COLOUR_NO.format(colour0=a.colour, colour1=b.colour))
    return TaskRecord("comparison", [a.mask, b.mask], [_info(a), _info(b)], [("human", question), ("gpt", answer)])


def counting_task(scene: Scene, rng: np.random.Generator) -> TaskRecord:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    attribute = COUNT_ATTRIBUTES[int(rng.integers(2))]
    count = sum(getattr(o, attribute) == getattr(obj, attribute) for o in scene.objects if o is not obj)
    turns = [("human", COUNT_Q.format(attribute=attribute)), ("gpt", number_word(count))]
    return TaskRecord("counting", [obj.mask], [_info(obj)], turns)


def part_task(scene: Scene, rng: np.random.Generator) -> TaskRecord | None:
    composites = [o for o in scene.objects if o.parts]
    if not composites:
        return None
    obj = composites[int(rng.integers(len(composites)))]
    part = str(rng.choice(sorted(obj.parts)))
    if rng.random() < 0.5:
        part_info = {"category": part, "colour": obj.part_colours[part], "part_of": obj.category,
                     "area": int(obj.part_masks[part].sum())}
        turns = [("human", PART_NAME_Q), ("gpt", part)]
        return TaskRecord("part", [obj.mask, obj.part_masks[part]], [_info(obj), part_info], turns)
    turns = [("human", PART_COLOUR_Q.format(part=part)), ("gpt", obj.part_colours[part])]
    return TaskRecord("part", [obj.mask], [_info(obj)], turns)


def choice_task(scene: Scene, rng: np.random.Generator) -> TaskRecord:
    """Lettered-option questions on a still image, in VideoRefer-Bench-Q's layout (its Basic type): the
    colour or the shape of up to three objects, one question per turn, answered by `(X) option`."""
    picked = [scene.objects[i] for i in rng.permutation(len(scene.objects))[:3]]
    turns = []
    for k, obj in enumerate(picked):
        if rng.random() < 0.5:
            question, (options, answer) = CHOICE_COLOUR_Q.format(k=k), _options(rng, obj.colour, COLOURS)
        else:
            question, (options, answer) = CHOICE_SHAPE_Q.format(k=k), _options(rng, obj.category, SHAPE_NAMES)
        turns += [("human", bench_q_prompt(question, options)), ("gpt", answer)]
    return TaskRecord("image_choice", [o.mask for o in picked], [_info(o) for o in picked], turns)


def location_task(scene: Scene, rng: np.random.Generator) -> TaskRecord:
    """Where up to three objects are, each by the 3×3 cell of its centroid ('in the top left corner')."""
    picked = [scene.objects[i] for i in rng.permutation(len(scene.objects))[:3]]
    turns = []
    for obj in picked:
        height, width = obj.mask.shape
        turns += [("human", LOCATION_Q), ("gpt", position_phrase(*obj.centroid, height, width))]
    return TaskRecord("location", [o.mask for o in picked], [_info(o) for o in picked], turns)


IMAGE_TASKS = (category_task, short_caption_task, detailed_caption_task, relation_task, comparison_task,
               counting_task, part_task)


def image_tasks(scene: Scene, rng: np.random.Generator, image_choice: bool = False,
                location: bool = False, option_first: bool = False) -> list[TaskRecord]:
    """Every image task that has an unambiguous question on this scene, with `image_choice` the lettered
    questions too and with `location` the location questions. Those draw last (in that order), so turning
    them on leaves every other record of the seed unchanged. With `option_first` the lettered answers name
    the option before the letter (`option_first_record`; draws nothing)."""
    records = [record for make in IMAGE_TASKS if (record := make(scene, rng)) is not None]
    records += [choice_task(scene, rng)] if image_choice else []
    records += [location_task(scene, rng)] if location else []
    return [option_first_record(record) for record in records] if option_first else records


# ----------------------------------------------------------------------------- video tasks


def motion_phrase(track: Track) -> str:
    """'moves left', 'appears and then stays still', 'moves up and then disappears'."""
    return EVENT_PHRASES[track.event].format(motion=MOTION_PHRASES[track.motion])


def _track_info(track: Track) -> dict:
    return {"category": track.category, "colour": track.colour, "size": track.size, "motion": track.motion,
            "speed": track.speed, "event": track.event}


def video_caption_task(video: VideoScene) -> TaskRecord:
    turns = []
    for k, track in enumerate(video.tracks):
        answer = VIDEO_CAPTION_A.format(colour=track.colour, category=track.category, phrase=motion_phrase(track))
        turns += [("human", VIDEO_CAPTION_Q.format(k=k)), ("gpt", answer)]
    masks = [track.masks for track in video.tracks]
    return TaskRecord("video_caption", masks, [_track_info(t) for t in video.tracks], turns)


def _options(rng: np.random.Generator, correct: str, distractors, count: int = 4) -> tuple[list[str], str]:
    """Lettered options holding `correct` and up to count-1 distractors, shuffled; and the answer option."""
    pool = [d for d in dict.fromkeys(distractors) if d != correct]
    texts = [correct] + [pool[i] for i in rng.permutation(len(pool))[: count - 1]]
    texts = [texts[i] for i in rng.permutation(len(texts))]
    options = [f"({LETTERS[i]}) {text}" for i, text in enumerate(texts)]
    return options, options[texts.index(correct)]


def _multiple_choice(qtype: str, question: str, tracks: list[Track], options: tuple[list[str], str]) -> TaskRecord:
    choices, answer = options
    mc = {"Question": question, "type": qtype, "options": choices, "Answer": answer}
    return TaskRecord("multiple_choice", [t.masks for t in tracks], [_track_info(t) for t in tracks], question=mc)


def basic_question(video: VideoScene, rng: np.random.Generator) -> TaskRecord:
    track = video.tracks[int(rng.integers(len(video.tracks)))]
    if rng.random() < 0.5:
        return _multiple_choice("Basic", BASIC_COLOUR_Q, [track], _options(rng, track.colour, COLOURS))
    return _multiple_choice("Basic", BASIC_SHAPE_Q, [track], _options(rng, track.category, CATEGORIES))


def sequential_question(video: VideoScene, rng: np.random.Generator) -> TaskRecord:
    eventful = [t for t in video.tracks if t.event] or video.tracks
    track = eventful[int(rng.integers(len(eventful)))]
    phrases = [SEQUENTIAL_OPTION.format(phrase=EVENT_PHRASES[e].format(motion=m))
               for e in EVENT_PHRASES for m in MOTION_PHRASES.values()]
    correct = SEQUENTIAL_OPTION.format(phrase=motion_phrase(track))
    return _multiple_choice("Sequential", SEQUENTIAL_Q, [track], _options(rng, correct, phrases))


def relationship_question(video: VideoScene, rng: np.random.Generator) -> TaskRecord | None:
    candidates = []
    for a in video.tracks:
        for b in video.tracks:
            common = sorted(a.masks.keys() & b.masks.keys())  # first frame where both are seen
            side = direction(a.center(common[0]), b.center(common[0])) if a is not b and common else None
            if side is not None:
                candidates.append((a, b, side))
    if not candidates:
        return None
    a, b, side = candidates[int(rng.integers(len(candidates)))]
    texts = {s: f"{relation} <object1>" for s, relation in RELATIONS.items()}
    return _multiple_choice("Relationship", RELATIONSHIP_Q, [a, b], _options(rng, texts[side], texts.values()))


def reasoning_question(video: VideoScene, rng: np.random.Generator) -> TaskRecord | None:
    if len(video.tracks) < 2:
        return None
    a, b = (video.tracks[i] for i in rng.permutation(len(video.tracks))[:2])
    if a.speed == b.speed:
        correct = SPEED_OPTIONS[3] if a.speed == 0 else SPEED_OPTIONS[2]
    else:
        correct = SPEED_OPTIONS[0] if a.speed > b.speed else SPEED_OPTIONS[1]
    return _multiple_choice("Reasoning", REASONING_Q, [a, b], _options(rng, correct, SPEED_OPTIONS))


def future_question(video: VideoScene, rng: np.random.Generator) -> TaskRecord | None:
    staying = [t for t in video.tracks if t.event != "disappears"]
    if not staying:
        return None
    track = staying[int(rng.integers(len(staying)))]
    options = _options(rng, FUTURE_PHRASES[track.motion], FUTURE_PHRASES.values())
    return _multiple_choice("Future", FUTURE_Q, [track], options)


def _located(video: VideoScene, kind: str, question: str, pick) -> TaskRecord:
    turns = []
    for k, track in enumerate(video.tracks):
        frame = pick(track.masks)
        height, width = track.masks[frame].shape
        turns += [("human", question.format(k=k)), ("gpt", position_phrase(*track.center(frame), height, width))]
    return TaskRecord(kind, [t.masks for t in video.tracks], [_track_info(t) for t in video.tracks], turns)


def video_location_task(video: VideoScene) -> TaskRecord:
    """Where each track is on the first frame it is seen, by the 3×3 cell of its centre."""
    return _located(video, "video_location", VIDEO_LOCATION_Q, min)


def video_last_location_task(video: VideoScene) -> TaskRecord:
    """Where each track is on the last frame it is seen: beside `video_location_task`, its motion in two cells."""
    return _located(video, "video_last_location", VIDEO_LAST_LOCATION_Q, max)


def short_answer_task(choice: TaskRecord) -> TaskRecord | None:
    """A multiple-choice question asked without its options and answered in one word (`SHORT_ANSWER_WORDS`:
    "left", "higher", "<object0>", "neither"…), for the types whose answer is a relation, a future place or a
    speed comparison; None for the others. Same masks and objects as the question; draws nothing."""
    question = choice.question
    text = question["Answer"].split(") ", 1)[1]
    if text not in SHORT_ANSWER_WORDS:
        return None
    turns = [("human", f"{question['Question']} {SHORT_ANSWER_SUFFIX}"), ("gpt", SHORT_ANSWER_WORDS[text])]
    return TaskRecord("video_short_answer", choice.masks, choice.objects, turns, name=question["type"].lower())


def option_first_record(record: TaskRecord) -> TaskRecord:
    """`record` with its lettered answers naming the option before its letter ("(B) left of <object1>" ->
    "left of <object1> (B)"): the answer is written, and so decided, before its letter has to be found among the
    options. The parsers (`evaluation.choice`) read the letter either way. Other records come back unchanged."""
    if record.question is not None:
        question = dict(record.question, Answer=option_first_answer(record.question["Answer"]))
        return dataclasses.replace(record, question=question)
    if record.task != "image_choice":
        return record
    turns = [(role, option_first_answer(text) if role == "gpt" else text) for role, text in record.conversation]
    return dataclasses.replace(record, conversation=turns)


def answer_word_record(record: TaskRecord) -> TaskRecord:
    """`record` with an option-first lettered answer whose option has a one-word answer (`SHORT_ANSWER_WORDS`)
    written as that word, then the letter: "above <object1> (C)" -> "above (C)", "further to the left (A)" ->
    "left (A)". The word is the one only that option holds, so it is the last token before the letter: the key
    the letter is looked up by, where the full text of a Relationship option ends in the "<object1>" every option
    ends in. Other records come back unchanged."""
    question = record.question
    if question is None:
        return record
    text, letter = question["Answer"].rsplit(" ", 1)
    if not re.fullmatch(r"\([A-Z]\)", letter):
        raise ValueError(f"answer words need an option-first answer, not {question['Answer']!r}")
    word = SHORT_ANSWER_WORDS.get(text)
    return record if word is None else dataclasses.replace(record, question=dict(question, Answer=f"{word} {letter}"))


SPEED_STILL = "does not move"
SPEED_MOVING = "moves at speed {speed}"
SPEED_STEPS_A = "{first} and {second}: {answer}"


def speed_step(name: str, info: dict) -> str:
    """One object's speed as a Reasoning answer's step states it, in pixels a frame: "<object0> moves at speed 3",
    "<object1> does not move"."""
    return f"{name} {SPEED_MOVING.format(speed=info['speed']) if info['speed'] else SPEED_STILL}"


def stated_speeds(answer: str) -> dict[int, int]:
    """The speeds an answer states for its objects, as `speed_step` writes them: {0: 3, 1: 0} for "<object0> moves
    at speed 3 and <object1> does not move: …"; objects it says nothing of are absent."""
    found = re.finditer(r"<object(\d+)> (?:moves at speed (\d+)|(does not move))", answer)
    return {int(m[1]): int(m[2]) if m[2] else 0 for m in found}


def speed_steps_record(record: TaskRecord) -> TaskRecord:
    """`record` with a Reasoning question's option-first answer led by each object's speed: "<object0> moves at
    speed 3 and <object1> does not move: <object0> (B)". The comparison is then made between two written
    speeds, each stated right after its object is named, instead of at the answer's first token. Needs an
    option-first answer (the steps must come before the letter); other records come back unchanged."""
    question = record.question
    if question is None or question["type"] != "Reasoning":
        return record
    if question["Answer"].startswith("("):
        raise ValueError(f"speed steps need an option-first answer, not {question['Answer']!r}")
    first, second = (speed_step(f"<object{k}>", info) for k, info in enumerate(record.objects))
    answer = SPEED_STEPS_A.format(first=first, second=second, answer=question["Answer"])
    return dataclasses.replace(record, question=dict(question, Answer=answer))


def option_first_answer(answer: str) -> str:
    """A lettered answer written option first: "(B) left of <object1>" -> "left of <object1> (B)"."""
    letter, text = answer.split(" ", 1)
    return f"{text} {letter}"


MULTIPLE_CHOICE = (basic_question, sequential_question, relationship_question, reasoning_question, future_question)


def video_tasks(video: VideoScene, rng: np.random.Generator, location: bool = False,
                last_location: bool = False, short_answers: bool = False,
                option_first: bool = False, speed_steps: bool = False,
                answer_words: bool = False) -> list[TaskRecord]:
    """The motion caption, every multiple-choice type that has an unambiguous question on this video, with
    `location` where each track is first seen, with `last_location` where it is last seen and with
    `short_answers` the Relationship, Reasoning and Future questions again without options, answered in one
    word (last, drawing nothing, so the other records stay the same). With `option_first` the lettered answers
    name the option before the letter (`option_first_record`; draws nothing), and with `speed_steps` too a
    Reasoning answer first states both objects' speeds (`speed_steps_record`; needs `option_first`), and with
    `answer_words` an answer whose option has a one-word answer is that word ("above (C)",
    `answer_word_record`; needs `option_first`)."""
    for name, wanted in (("speed_steps", speed_steps), ("answer_words", answer_words)):
        if wanted and not option_first:
            raise ValueError(f"{name} needs option_first: what it writes comes before the answer's letter")
    records = [video_caption_task(video)]
    choices = [record for make in MULTIPLE_CHOICE if (record := make(video, rng)) is not None]
    records += choices
    records += [video_location_task(video)] if location else []
    records += [video_last_location_task(video)] if last_location else []
    records += [record for choice in choices if (record := short_answer_task(choice))] if short_answers else []
    if option_first:
        records = [option_first_record(record) for record in records]
    if answer_words:
        records = [answer_word_record(record) for record in records]
    return [speed_steps_record(record) for record in records] if speed_steps else records


# Every literal string the generator writes, for `shapesworld_vocabulary()`.
TEMPLATES = (
    CATEGORY_Q, SHORT_Q, DETAILED_Q, RELATION_Q, RELATION_A, SIZE_Q, SIZE_A, SAME_COLOUR_Q, SAME_COLOUR_YES,
    SAME_COLOUR_NO, COUNT_Q, PART_NAME_Q, PART_COLOUR_Q, DETAIL_LOOK, DETAIL_PARTS, DETAIL_HIDDEN, DETAIL_NEAREST,
    DETAIL_COUNT, VIDEO_CAPTION_Q, VIDEO_CAPTION_A, BASIC_COLOUR_Q, BASIC_SHAPE_Q, CHOICE_COLOUR_Q,
    CHOICE_SHAPE_Q, SEQUENTIAL_Q, RELATIONSHIP_Q, REASONING_Q, FUTURE_Q, LOCATION_Q, VIDEO_LOCATION_Q,
    VIDEO_LAST_LOCATION_Q, SHORT_ANSWER_SUFFIX, *SHORT_ANSWER_WORDS.values(),
    *RELATIONS.values(), *DIRECTIONS.values(),
    *MOTION_PHRASES.values(), *EVENT_PHRASES.values(), *FUTURE_PHRASES.values(), *SPEED_OPTIONS,
    SPEED_STILL, SPEED_MOVING, SPEED_STEPS_A, *NUMBER_WORDS,
    *ROWS, *COLUMNS,
    *POSITIONS.values(), *MOTIONS, SEQUENTIAL_OPTION, *SIZE_ADJECTIVES, *COUNT_ATTRIBUTES, *ARTICLES, *LIST_JOINERS,
    *(f"({letter})" for letter in LETTERS),
)
